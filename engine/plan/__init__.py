"""Planning a run before it runs: memory per rank (memory.py, shared with the dry run),
communication per step per group (communication.py), step time from FLOPs (step_time.py), and the
layouts a cluster allows, refused or ranked (layouts.py). launch/plan.py prints them."""

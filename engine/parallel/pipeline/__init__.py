"""Pipeline parallelism: which layers each stage holds (stages.py) and the transfers between
adjacent stages (p2p.py). The schedules that drive stages belong in engine/train/."""

"""Pipeline parallelism: the stage split (stages.py). The schedules that drive stages live in
engine/train/; point-to-point transfers between stages beside this file."""

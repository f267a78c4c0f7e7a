"""The training script (train.py) and its parts.

`python -m training.train --help` and `detr-custom-train --help` print the flags from here, before train.py imports
torch, accelerate and the model (seconds): the flags are read from the config's source (arguments.py).
"""
import sys
from pathlib import Path


def _training_script_help_requested() -> bool:
    argv = getattr(sys, "orig_argv", [])
    script = any(argv[i:i + 2] == ["-m", "training.train"] for i in range(len(argv))) or (
        Path(sys.argv[0]).name == "detr-custom-train")
    return script and any(arg in ("-h", "--help") for arg in sys.argv[1:])


if _training_script_help_requested():
    from .arguments import print_help_and_exit

    print_help_and_exit()

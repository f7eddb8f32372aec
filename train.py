"""Compress a Mixture-of-Experts LLM with SlimMoE, stage by stage.

    python train.py                                   # the embedded demo (conf/demo.yaml), CPU, ~minutes
    python train.py --config conf/phi_mini.yaml       # a real recipe; any key can be overridden:
    python train.py --config conf/phi_tiny.yaml --trainer.devices 8 --trainer.num_nodes 8
    python train.py --config conf/demo.yaml --resume true   # continue a killed run
"""

import sys

from lightning_slimmoe.cli import main, run_command

if __name__ == "__main__":
    run_command(main, sys.argv[1:])

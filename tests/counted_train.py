"""train.py, with the learning rate of every optimizer step appended to $COUNTED_STEPS.<rank>: lets a test that runs
training in a subprocess (signals, several processes) see how many steps a resumed run really took."""

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script, like train.py

from moebert.training import setup  # noqa: E402
import train  # noqa: E402

RECORD = f"{os.environ['COUNTED_STEPS']}.{os.environ.get('RANK', '0')}"
make_optimizer = setup.make_optimizer


class CountedAdamW(torch.optim.AdamW):
    def step(self, closure=None):
        with open(RECORD, "a") as record:
            record.write(f"{self.param_groups[0]['lr']!r}\n")
        return super().step(closure)


def counted(*args):
    optimizer = make_optimizer(*args)
    optimizer.__class__ = CountedAdamW
    return optimizer


setup.make_optimizer = counted

if __name__ == "__main__":
    train.main()

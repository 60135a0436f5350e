"""Golden losses: tiny-cpu's first 20 training losses and its final val_bpb (before and after
the quantization round trip), bit for bit on the CPU with 2 threads. A change that should not
alter the math must reproduce them; one that does regenerates the file on purpose:
`python tests/test_golden.py` (and says why in its commit).

Both final scores are taken on the first `val_max_tokens` validation tokens (the golden file's
value, tiny-cpu's periodic-validation cap: a tenth of the built-in split) through the run's own
`Trainer.validate`, the path the periodic validation takes: the whole split costs ~14 s a pass."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from underpar import config as cfglib
from underpar.runs.rundir import RunDir
from underpar.tracks import pretrain
from underpar.tracks.pretrain_trainer import Trainer

GOLDEN = Path(__file__).parent / "golden" / "tiny-cpu.json"


def run_golden(data_dir: Path, runs: Path) -> dict:
    golden = json.loads(GOLDEN.read_text())
    threads, validate = torch.get_num_threads(), Trainer.validate
    torch.set_num_threads(golden["threads"])  # CPU reductions split by thread count
    Trainer.validate = lambda self, max_tokens=0, label="": validate(self, max_tokens or golden["val_max_tokens"], label)
    try:
        sets = golden["overrides"] + [f"data.out={data_dir}", f"train.runs_root={runs}"]
        summary = pretrain.run(cfglib.resolve("pretrain", golden["preset"], sets))
    finally:
        torch.set_num_threads(threads)
        Trainer.validate = validate
    losses = [r["train_loss"] for r in RunDir(summary.run_dir).metrics() if "train_loss" in r]
    return {"losses": losses, "val_bpb_pre_quant": summary.val_bpb_pre_quant, "val_bpb": summary.val_bpb}


def test_tiny_cpu_reproduces_the_golden_losses(builtin_data, tmp_path):
    golden = json.loads(GOLDEN.read_text())
    got = run_golden(builtin_data[0], tmp_path)
    assert got["losses"] == golden["losses"]
    assert got["val_bpb_pre_quant"] == golden["val_bpb_pre_quant"]
    assert got["val_bpb"] == golden["val_bpb"]


if __name__ == "__main__":  # regenerate: python tests/test_golden.py [data folder]
    import tempfile

    from underpar.data.config import DataConfig
    from underpar.data.prepare import prepare

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tmp) / "data"
        prepare(DataConfig(out=str(data)))
        golden = json.loads(GOLDEN.read_text())
        golden.update(run_golden(data, Path(tmp) / "runs"), torch=torch.__version__)
        GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
        print(f"wrote {GOLDEN}")

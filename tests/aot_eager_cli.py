"""`underpar ...` with torch.compile on the aot_eager backend (dynamo and AOT autograd, where DDP
wrapping and graph breaks surface, without inductor's C++ build: test_model compiles with
inductor on the CPU). For subprocess tests: `torchrun ... tests/aot_eager_cli.py pretrain ...`."""

import torch

from underpar import cli

_compile = torch.compile
torch.compile = lambda model, **kw: _compile(model, **{**kw, "backend": "aot_eager", "options": None})

if __name__ == "__main__":
    cli.main()

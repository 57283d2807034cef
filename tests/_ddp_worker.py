"""Worker for test_l1dfl_ddp: one rank of a two-process gloo group computing L1DFL on its half batch."""

import os
import sys

import torch
import torch.distributed as dist


def run_rank(rank: int, world_size: int, init_file: str, inputs_path: str, out_dir: str) -> None:
    sys.path.insert(0, os.environ["L1DFL_REPO_ROOT"])  # the working tree under test
    from nnunetv2_l1dfl import L1DFLLoss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        data = torch.load(inputs_path)
        half = data["logits"].shape[0] // world_size
        results = {}
        for name, kwargs in data["configs"].items():
            x = data["logits"][rank * half:(rank + 1) * half].clone().requires_grad_(True)
            target = data["targets"][name][rank * half:(rank + 1) * half]
            loss = L1DFLLoss(**kwargs)(x, target)  # ddp as the config says (omitted: the default)
            loss.backward()
            results[name] = {"loss": loss.detach(), "grad": x.grad.detach()}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()

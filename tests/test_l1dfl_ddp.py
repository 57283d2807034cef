"""Under DDP, N ranks with L1DFLLoss(ddp=True), the default, must equal one process on the
concatenated batch; ddp=False gives each rank its own histogram.

DDP averages parameter gradients over ranks, so the quantities to compare are the mean of the
rank losses and (gradient on each rank's logits) / world_size, against the single-process loss
and its gradient. This holds only because the histogram is global (all-reduced counts), the focal
mean uses the global element count, and batch Dice gathers its sums.
"""

import os

import pytest
import torch
import torch.multiprocessing as mp

from nnunetv2_l1dfl import L1DFLLoss

CONFIGS = {
    "per_sample": {"bin_width": 0.1, "gamma": 2.0},  # ddp left at its default (True)
    "batch_dice": {"bin_width": 0.1, "gamma": 2.0, "batch_dice": True, "ddp": True},
    "ignore_label": {"bin_width": 0.05, "gamma": 1.0, "ignore_label": 3, "ddp": True},
    "reference_backend": {"bin_width": 0.2, "gamma": 5.0, "backend": "reference", "batch_dice": True, "ddp": True},
    "ddp_off": {"bin_width": 0.1, "gamma": 2.0, "ddp": False},  # each rank its own histogram
}


def _spawn_target(rank, world_size, init_file, inputs_path, out_dir):
    from _ddp_worker import run_rank

    run_rank(rank, world_size, init_file, inputs_path, out_dir)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without torch.distributed")
def test_two_gloo_ranks_equal_one_process(tmp_path, repo_root, monkeypatch):
    world_size = 2
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 6, 5, 4, generator=gen) * 3
    target = torch.randint(0, 3, (4, 1, 6, 5, 4), generator=gen).to(torch.int16)
    target[:2][torch.rand(target[:2].shape, generator=gen) > 0.7] = 3  # ranks see different ignored counts
    targets = {name: target if "ignore_label" in kw else torch.where(target == 3, 0, target).to(torch.int16)
               for name, kw in CONFIGS.items()}
    inputs = tmp_path / "inputs.pt"
    torch.save({"logits": logits, "targets": targets, "configs": CONFIGS}, inputs)
    monkeypatch.setenv("L1DFL_REPO_ROOT", str(repo_root))
    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    mp.spawn(_spawn_target, args=(world_size, str(tmp_path / "init"), str(inputs), str(tmp_path)),
             nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    for name, kwargs in CONFIGS.items():
        if name == "ddp_off":  # ddp=False: every rank is a process of its own, local histogram
            for r, rank in enumerate(ranks):
                x = logits[r * 2:(r + 1) * 2].clone().requires_grad_(True)
                local = L1DFLLoss(**kwargs)(x, targets[name][r * 2:(r + 1) * 2])
                local.backward()
                torch.testing.assert_close(rank[name]["loss"], local.detach(), rtol=1e-6, atol=1e-7)
                torch.testing.assert_close(rank[name]["grad"], x.grad, rtol=1e-5, atol=1e-8)
            assert not torch.isclose(ranks[0][name]["loss"], ranks[0]["per_sample"]["loss"], rtol=1e-6)
            continue
        x = logits.clone().requires_grad_(True)
        single = L1DFLLoss(**kwargs)(x, targets[name])
        single.backward()
        mean_loss = torch.stack([r[name]["loss"] for r in ranks]).mean()
        torch.testing.assert_close(mean_loss, single.detach(), rtol=1e-5, atol=1e-6, msg=f"loss, {name}")
        ddp_grad = torch.cat([r[name]["grad"] for r in ranks]) / world_size
        torch.testing.assert_close(ddp_grad, x.grad, rtol=1e-4, atol=1e-7, msg=f"gradient, {name}")
        if name == "per_sample":  # the check has teeth: local histograms would give other weights
            local = L1DFLLoss(**kwargs)(logits[:2], targets[name][:2])
            assert not torch.isclose(local, ranks[0][name]["loss"], rtol=1e-6)

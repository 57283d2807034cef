"""``l1dfl bench``: its straightforward L1DFL baseline equals the fused loss, and the command runs."""

from __future__ import annotations

import json

import pytest
import torch
from _kernels_helpers import assert_close_relative, make_case

from nnunetv2_l1dfl.bench import BenchShape, deep_supervision_weights, make_inputs, straightforward_l1dfl
from nnunetv2_l1dfl.cli import main as l1dfl_main
from nnunetv2_l1dfl.losses.l1dfl import L1DFLLoss


@pytest.mark.parametrize("bin_width,gamma,C,shape", [(0.1, 2.0, 2, (2, 12, 11, 9)), (0.05, 5.0, 4, (2, 20, 18))])
def test_straightforward_baseline_equals_fused_loss(bin_width, gamma, C, shape):
    logits, target = make_case(shape, C, n_per_unit=round(1 / bin_width), seed=C)
    x_fused, x_plain = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    fused = L1DFLLoss(bin_width=bin_width, gamma=gamma, backend="fused")(x_fused, target)
    plain = straightforward_l1dfl(x_plain, target, bin_width=bin_width, gamma=gamma)
    fused.backward()
    plain.backward()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=0)
    assert_close_relative(x_fused.grad, x_plain.grad, rtol=1e-5)


def test_deep_supervision_weights_are_nnunets():
    weights = deep_supervision_weights(5)
    expected = torch.tensor([1, 0.5, 0.25, 0.125, 0.0]) / 1.875
    assert torch.allclose(torch.as_tensor(weights, dtype=torch.float32), expected)
    logits, targets = make_inputs(BenchShape("t", 2, (16, 16, 16), 3, False), 3, torch.device("cpu"), torch.float32)
    assert [tuple(x.shape) for x in logits] == [(2, 3, 16, 16, 16), (2, 3, 8, 8, 8), (2, 3, 4, 4, 4)]
    assert [tuple(t.shape) for t in targets] == [(2, 1, 16, 16, 16), (2, 1, 8, 8, 8), (2, 1, 4, 4, 4)]
    assert targets[0].dtype == torch.int16 and int(targets[0].max()) >= 1


def test_bench_quick_writes_table_and_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = l1dfl_main(
        ["bench", "--quick", "--device", "cpu", "--losses", "l1dfl_fused,l1dfl_straightforward,dc_and_ce",
         "--json", str(out)]
    )  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "l1dfl_fused" in printed and "bench: 3 measurements on cpu" in printed
    payload = json.loads(out.read_text())
    rows = {row["loss"]: row for row in payload["results"]}
    assert set(rows) == {"l1dfl_fused", "l1dfl_straightforward", "dc_and_ce"}
    assert rows["dc_and_ce"]["time_ratio"] == pytest.approx(1.0)
    assert rows["l1dfl_fused"]["median_ms"] > 0 and rows["l1dfl_fused"]["peak_extra_mib"] > 0
    # the same inputs: the fused loss and the straightforward baseline agree
    assert rows["l1dfl_fused"]["loss_value"] == pytest.approx(rows["l1dfl_straightforward"]["loss_value"], rel=1e-5)
    assert payload["machine"]["torch_threads"] == 2


def test_bench_rejects_unknown_shape(capsys):
    assert l1dfl_main(["bench", "--device", "cpu", "--shapes", "4d"]) == 2
    assert "unknown shape" in capsys.readouterr().err


def test_gpu_verification_checks_run_on_cpu():
    # the script a GPU session runs (l1dfl bench --verify-cuda), exercised with the CPU kernels
    from nnunetv2_l1dfl.kernels.verify_cuda import kernel_vs_copy_time, run_checks

    checks = run_checks(torch.device("cpu"), include_compile=False)
    assert [c.name for c in checks] == [
        "equal_to_cpu", "no_host_sync", "autocast_fp16", "deep_supervision", "deterministic"
    ]  # fmt: skip
    assert all(c.ok for c in checks), [(c.name, c.detail, c.numbers) for c in checks if not c.ok]
    timing = kernel_vs_copy_time(torch.device("cpu"), shape=(1, 2, 16, 16, 16), repeats=3)
    assert timing["fused_fwd_bwd_ms"] > 0 and timing["copy_ms"] > 0

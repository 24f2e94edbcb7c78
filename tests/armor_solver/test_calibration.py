import pytest
import torch

from armor_solver import calibration
from armor_solver.stats import LayerStats


def direct_inputs(model, ids):
    """Inputs of every target linear from one ordinary forward pass of the whole model."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            handles.append(module.register_forward_hook(
                lambda m, i, o, n=name: seen.setdefault(n, []).append(i[0].reshape(-1, i[0].shape[-1]))))
    with torch.no_grad():
        model(ids, use_cache=False)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "gemma3"])
def test_layerwise_stats_equal_a_direct_forward(family, solver_make_model):
    model = solver_make_model(family)
    ids = torch.randint(0, 256, (5, 24), generator=torch.Generator().manual_seed(2))
    stats = calibration.collect_dense_stats(model, ids, full=True)
    direct = direct_inputs(model, ids)
    assert set(stats) == set(direct) and len(stats) == 14
    for name, s in stats.items():
        x = direct[name].double()
        assert s.n_tokens == 5 * 24
        torch.testing.assert_close(s.h.double(), x.square().mean(0), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.xtx.double(), x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(s.sq_norm.double(), x.square().sum(0), rtol=1e-4, atol=1e-5)


def test_batch_size_does_not_change_the_statistics(solver_make_model):
    model = solver_make_model()
    ids = torch.randint(0, 256, (5, 16), generator=torch.Generator().manual_seed(4))
    one = calibration.LayerwiseRunner(model, ids, batch_size=1)
    three = calibration.LayerwiseRunner(model, ids, batch_size=3)
    assert [h.shape[0] for h in three.hidden] == [3, 2]
    linears = calibration.find_targets(model)[0]
    s1, s3 = calibration.new_stats(linears, False, "cpu"), calibration.new_stats(linears, False, "cpu")
    one.run_block(0, s1, linears)
    three.run_block(0, s3, linears)
    for name in linears:
        torch.testing.assert_close(s1[name].h, s3[name].h)
    torch.testing.assert_close(torch.cat(one.hidden), torch.cat(three.hidden))


def test_blocks_must_run_in_order(solver_make_model):
    runner = calibration.LayerwiseRunner(solver_make_model(), torch.zeros(1, 8, dtype=torch.long))
    with pytest.raises(RuntimeError, match="out of order"):
        runner.run_block(1)


def test_model_without_decoder_blocks():
    with pytest.raises(calibration.CalibrationError, match="no decoder block list"):
        calibration.decoder_layers(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def test_nan_statistics_are_named():
    s = LayerStats.empty(8)
    s.add(torch.full((2, 8), float("nan")))
    with pytest.raises(calibration.CalibrationError, match="layer.x: calibration statistics h contain NaN"):
        calibration.check_finite_stats("layer.x", s)

"""One block-size rule (``armor_kernels.block_pair``) for the solver, the runtime and the CLI's default."""

import argparse

import torch

from armor_kernels import block_pair, wrapper_overhead
from armor_runtime.commands import prune as prune_cmd
from armor_runtime.linear import ArmorLinear
from armor_solver.methods import armor
from armor_solver.pipeline import Calibration, PruneSettings, prune_model


def test_solver_and_runtime_share_the_rule():
    for d_out, d_in in ((576, 1536), (192, 576), (64, 32)):
        assert armor.block_sizes(d_out, d_in, None) == block_pair(d_out, d_in)
        assert armor.block_sizes(d_out, d_in, 128) == block_pair(d_out, d_in, 128)
        lin = ArmorLinear(d_in, d_out)
        assert tuple(lin.a.shape[1:]) == (block_pair(d_out, d_in, 128)[0],) * 2
        assert tuple(lin.b.shape[1:]) == (block_pair(d_out, d_in, 128)[1],) * 2


def test_cli_default_is_the_wrapper_budget():
    parser = argparse.ArgumentParser()
    prune_cmd.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--method", "armor", "--out", "o"])
    assert args.block_size is None and args.wrapper_budget == 0.0625
    args.unknown = []
    settings = prune_cmd.settings_from_args(args, dtype="float32")
    assert settings.block_size is None and settings.wrapper_budget == 0.0625


def test_pipeline_without_a_block_size_keeps_every_layer_within_the_budget(solver_make_model):
    model = solver_make_model(hidden=128)  # 128-wide attention, 256-wide MLP
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    settings = PruneSettings(model="tiny", method="armor", nsamples=2, seqlen=16, block_size=None,
                             wrapper_budget=0.125, text="t.txt", extra={"sweeps": 1})
    result = prune_model(model, None, settings, calib=Calibration(ids=ids), log=lambda s: None)
    for info in result.layers.values():
        d_out, d_in = info["shape"]
        assert (info["block_out"], info["block_in"]) == block_pair(d_out, d_in, None, 0.125)
        assert wrapper_overhead(d_out, d_in, info["block_out"], info["block_in"]) <= 0.125
    assert {(i["block_out"], i["block_in"]) for i in result.layers.values()} != {(1, 4)}  # real wrappers

"""The main job (python -m adaption_fx) at a small size, so it cannot rot."""

from __future__ import annotations

import pytest

from adaption_fx.demo import main, run_demo


def test_demo_starts_at_the_base_model_and_learns():
    result = run_demo(steps=40, progress=False)
    assert result.zero_init_identical
    assert len(result.losses) == 40
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert last < first - 0.5, (first, last)
    assert result.trainable_params == 4 * 10 * 128 + 4
    assert result.adapted_layers == [f"model.layers.{i}.self_attn" for i in range(4)]
    # Generation (KV cache) ran with and without the adapter; 40 steps are too few for the
    # share of rule-following tokens to mean anything, so only its range is checked.
    assert set(result.rule_followed) == {"base", "adapted"}
    assert all(0 <= v <= 1 for v in result.rule_followed.values())


def test_cli(capsys):
    assert main(["--steps", "30", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "zero-init output identical to the base model: True" in out
    assert "greedy generation (KV cache) following the rule: base model" in out
    assert out.strip().endswith("OK")


def test_cli_rejects_bad_steps():
    with pytest.raises(SystemExit):
        main(["--steps", "0"])

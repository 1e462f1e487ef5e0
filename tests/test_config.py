"""Every config checks its values when made: errors name the field; the CLI names the option."""
from __future__ import annotations

import math

import pytest

from pipeline import config
from pipeline.cli import main
from pipeline.errors import ParameterError, UserError

CONFIGS = (config.FeaturesConfig, config.HeadsConfig, config.FinetuneConfig, config.CompareConfig,
           config.PredictConfig)


@pytest.mark.parametrize("cls", CONFIGS)
def test_the_defaults_are_valid(cls):
    cls()


@pytest.mark.parametrize("cls, values, message", [
    (config.FeaturesConfig, dict(batch_size=-3), "batch_size -3 must be >= 0"),
    (config.FeaturesConfig, dict(views=config.MAX_VIEWS + 1), f"views {config.MAX_VIEWS + 1} must be at most"),
    (config.FeaturesConfig, dict(workers=-2), "workers -2 must be between 0 and"),
    (config.FeaturesConfig, dict(dist_timeout=math.nan), "dist_timeout nan must be > 0"),
    (config.FeaturesConfig, dict(precision="fp8"), "precision 'fp8' is not recognised. Only auto, fp32"),
    (config.FeaturesConfig, dict(seed=-1), "seed -1 must be >= 0"),
    (config.HeadsConfig, dict(cv_folds=1), "cv_folds 1 must be >= 2"),
    (config.HeadsConfig, dict(jobs=config.MAX_PARALLEL + 1), "jobs"),
    (config.HeadsConfig, dict(format="pickle"), "format 'pickle' is not recognised. Only joblib, skops"),
    (config.HeadsConfig, dict(out_of_core=True, use_views=True), "drop use_views or out_of_core"),
    (config.FinetuneConfig, dict(mode="frozen"), "mode 'frozen' is not recognised"),
    (config.FinetuneConfig, dict(trainable_from="fc"), "(mode fixed trains fc alone)"),
    (config.FinetuneConfig, dict(momentum=1.0), "momentum 1.0 must be in [0, 1)"),
    (config.FinetuneConfig, dict(lr=math.inf), "lr inf must be > 0 and at most"),
    (config.FinetuneConfig, dict(lr=1.0, gamma=1e30, step_size=1, epochs=3), "use a smaller lr or gamma"),
    (config.FinetuneConfig, dict(seeds=(1, 1)), "seeds 1,1: give distinct integers"),
    (config.CompareConfig, dict(alpha=1.5), "alpha 1.5 is out of range"),
    (config.CompareConfig, dict(margin=0.0), "margin 0.0 is out of range"),
    (config.FinetuneConfig, dict(eval_every=-2), "eval_every -2 must be >= 0"),
    (config.PredictConfig, dict(format="xml"), "format 'xml' is not recognised"),
    (config.PredictConfig, dict(batch_size=-1), "batch_size -1 must be >= 0"),
])
def test_a_bad_value_names_the_field(cls, values, message):
    with pytest.raises(ParameterError) as exc:
        cls(**values)
    assert message in str(exc.value) and isinstance(exc.value, UserError)
    assert set(values) & set(exc.value.parameters)  # the CLI can name the option


def test_a_value_with_braces_is_shown_as_given():
    with pytest.raises(ParameterError, match=r"mode '\{x\}' is not recognised"):
        config.FinetuneConfig(mode="{x}")


@pytest.mark.parametrize("argv, line", [
    (["features", "--batch-size", "-3"], "error: --batch-size -3 must be >= 0"),
    (["features", "--dist-timeout", "0"], "error: --dist-timeout 0.0 must be > 0 seconds"),
    (["heads", "--out-of-core", "--use-views"], "drop --use-views or --out-of-core"),
    (["heads", "--cv-folds", "1"], "error: --cv-folds 1 must be >= 2"),
    (["finetune", "--trainable-from", "fc"], "(--mode fixed trains fc alone)"),
    (["finetune", "--lr", "1", "--gamma", "1e30", "--step-size", "1", "--epochs", "3"],
     "use a smaller --lr or --gamma"),
    (["compare", "--alpha", "0"], "error: --alpha 0.0 is out of range"),
])
def test_the_cli_names_the_option(capsys, argv, line):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and line in err, err


def test_export_needs_exactly_one_source():
    from pipeline.export import stage as export

    for cfg in (config.ExportConfig(), config.ExportConfig(head="logistic", run="finetune")):
        with pytest.raises(ParameterError, match=r"name one source: head NAME .*, run MODE.* or recommended"):
            export.run(cfg)

"""Bad input to the library's public functions: each case ends in one ``ValueError`` whose message
names the problem (asserted by a fragment), never in a torch internal error or a silent result.
The command-line counterpart is ``test_bad_input.py``."""

import os

import numpy as np
import pytest
import torch

from tsds_interp import ablation, edges, hf, metrics, patching, probe, traces
from tsds_interp.model import ModelConfig, build_model
from tsds_interp.rollout import rollout
from tsds_interp.task import Questions, TaskConfig, sample_questions

os.environ.setdefault("TQDM_DISABLE", "1")
TASK = TaskConfig(width=2, budget=2, train_cells=((1, 1), (1, 2), (2, 1)), ood_cells=((2, 2),))
WORDS = [*"0123456789", "*", "=", "ACCEPT", "REJECT"]
TOKENS = torch.tensor([[1, 7, 14, 8, 15, 6, 5, 17, 5, 6, 16, 2], [1, 6, 14, 7, 15, 10, 16, 2, 0, 0, 0, 0]])
ROLES = [["prompt"] * 5 + ["sample"] * 2 + ["decision"] + ["sample"] * 2 + ["decision", "end"],
         ["prompt"] * 5 + ["sample", "decision", "end", "pad", "pad", "pad", "pad"]]


@pytest.fixture(scope="module")
def native():
    torch.manual_seed(0)
    return build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0, task=TASK))


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return hf.boot(hf.save_random("gpt2", tmp_path_factory.mktemp("gpt2"), WORDS))


def mean_diff(logits):
    return (logits[:, -1, 16] - logits[:, -1, 17]).mean()


def contrast(model):
    clean = TOKENS[:, :8].clone() % model.cfg.d_vocab
    corrupted = clean.clone()
    corrupted[:, 3] = (corrupted[:, 3] + 1) % model.cfg.d_vocab
    return clean, corrupted


def q():
    return sample_questions(TASK, "train", 4, seed=0)


# (name, model fixture or None, call taking the model, fragment of the message)
CASES = [
    # traces
    ("float tokens", None, lambda m: traces.traces(TOKENS.float(), ROLES), "integer token ids"),
    ("bool tokens", None, lambda m: traces.traces(TOKENS > 3, ROLES), "integer token ids"),
    ("ragged roles", None, lambda m: traces.traces(TOKENS, [ROLES[0], ROLES[1][:5]]), "equal length"),
    ("roles of another shape", None, lambda m: traces.traces(TOKENS[:, :6], ROLES), "same shape"),
    ("a role that is a float", None, lambda m: traces.traces(TOKENS, [[1.5] * 12, [1] * 12]), "a name"),
    ("NaN reward", None, lambda m: traces.traces(TOKENS, ROLES, reward=[float("nan"), 1.0]), "finite"),
    ("group that splits rows", None, lambda m: traces.traces(TOKENS, ROLES, group=3), "group"),
    ("ids past the vocabulary", "gpt2", lambda m: traces.role_attribution(m, TOKENS + 100, ROLES), "vocabulary"),
    ("unknown objective", "gpt2", lambda m: traces.role_attribution(m, TOKENS, ROLES, objectives=("sft",)),
     "unknown objective 'sft'"),
    ("accept == reject", None, lambda m: traces.ds_counts(TOKENS, ROLES, 16, 16, [[False, True], [True]]),
     "different"),
    ("labels as strings", None, lambda m: traces.ds_counts(TOKENS, ROLES, 16, 17, [["False", "True"], ["True"]]),
     "True or False"),
    ("labels for too few rows", None, lambda m: traces.ds_counts(TOKENS, ROLES, 16, 17, [[False, True]]), "rows"),
    ("tokens and roles differ", None, lambda m: traces.ds_counts(TOKENS[:, :9], ROLES, 16, 17, [[1], [1]]),
     "same shape"),
    ("metric returns a vector", "gpt2", lambda m: traces.patch(m, *contrast(m), lambda lg: lg[:, -1, 0]),
     "one number"),
    ("metric returns NaN", "gpt2", lambda m: traces.patch(m, *contrast(m), lambda lg: lg.sum() * float("nan")),
     "finite"),
    ("metric returns a float", "gpt2", lambda m: traces.patch(m, *contrast(m), lambda lg: 1.0), "tensor"),
    ("unknown method", "gpt2", lambda m: traces.patch(m, *contrast(m), mean_diff, method="exact"), "method"),
    ("unknown grid", "gpt2", lambda m: traces.patch(m, *contrast(m), mean_diff, grid="heads"), "unknown patching grid"),
    ("float prompts", "gpt2", lambda m: traces.generate(m, TOKENS.float()), "integer token ids"),
    ("no new tokens", "gpt2", lambda m: traces.generate(m, TOKENS, 0), "max_new_tokens"),
    ("prompts of two lengths", "gpt2", lambda m: traces.generate(m, ["1 * 2 =", "12 * 3 = 4"]), "different lengths"),
    # patching
    ("tokens past the vocabulary", "native",
     lambda m: patching.activation_patch(m, TOKENS + 100, TOKENS + 100, mean_diff), "vocabulary"),
    ("contrast of two shapes", "native",
     lambda m: patching.activation_patch(m, TOKENS[:, :5], TOKENS[:, :6], mean_diff), "same shape"),
    ("empty contrast", "native",
     lambda m: patching.activation_patch(m, TOKENS[:0], TOKENS[:0], mean_diff), "non-empty"),
    ("non-differentiable metric", "native",
     lambda m: patching.attribution_patch(m, *contrast(m), lambda lg: lg.argmax(-1).float().mean()), "differentiable"),
    ("a model without a task", "gpt2", lambda m: patching.run_patching(m, "decision"), "tsds_interp.traces"),
    ("unknown direction", "native",
     lambda m: patching.activation_patch(m, *contrast(m), mean_diff, direction="up"), "direction"),
    # rollout
    ("questions as a list", "native", lambda m: rollout(m, [[1, 2], [3, 4]]), "Questions"),
    ("0-d operands", "native", lambda m: rollout(m, Questions(torch.tensor(3), torch.tensor(4))), "1-d"),
    ("an empty row slice", "native", lambda m: rollout(m, q(), rows=slice(0, 0)), "rows"),
    ("a task of another width", "native",
     lambda m: rollout(m, q(), task=TaskConfig(width=3, budget=2, train_cells=((1, 1),), ood_cells=())), "width"),
    ("negative temperature", "native", lambda m: rollout(m, q(), temperature=-1.0), "temperature"),
    # edges
    ("edge metric returns a vector", "native",
     lambda m: edges.edge_attribution(m, *contrast(m), lambda lg: lg[:, -1, 0]), "one number"),
    ("edges as a string", "native", lambda m: edges.edge_patch(m, *contrast(m), mean_diff, "L0H1"), "pairs"),
    # probe
    ("probe on a model without a task", "gpt2", lambda m: probe.probe_study(m), "tsds_interp.traces"),
    ("probe with no samples", "native", lambda m: probe.probe_study(m, samples=0), "samples"),
    # ablation (every argument checked before a rollout)
    ("ablation of no questions", "native", lambda m: ablation.ablation_sweep(m, 0),
     "questions must be an integer in [1, 1000000], got 0"),
    ("ablation of 1.5 questions", "native", lambda m: ablation.ablation_sweep(m, 1.5), "questions must be an integer"),
    ("ablation of too many questions", "native", lambda m: ablation.ablation_sweep(m, 10**6 + 1), "got 1000001"),
    ("an unknown ablation mode", "native", lambda m: ablation.ablation_sweep(m, 4, "half"),
     "mode must be one of zero, mean, resample, got 'half'"),
    ("a negative ablation temperature", "native", lambda m: ablation.ablation_sweep(m, 4, temperature=-1),
     "temperature must be a finite number in [0, 100], got -1"),
    ("a threshold above 1", "native", lambda m: ablation.ablation_sweep(m, 4, threshold=1.5),
     "threshold must be a finite number in [0, 1], got 1.5"),
    ("a batch of no episodes", "native", lambda m: ablation.ablation_sweep(m, 4, max_batch=0),
     "max_batch must be an integer in [1, 1048576], got 0"),
    ("a fractional batch", "native", lambda m: ablation.ablation_sweep(m, 4, max_batch=2.5),
     "max_batch must be an integer"),
    ("a seed that is not one", "native", lambda m: ablation.ablation_sweep(m, 4, seed=-1), "seed"),
    # metrics
    ("DS metrics of a table", None, lambda m: metrics.ds_metrics(np.zeros(3)), "Rollouts"),
    ("a probability above 1", None, lambda m: metrics.predicted_accuracy(1.2, 0.5, 0.5, 3), "p_s"),
    ("a budget of 0", None, lambda m: metrics.predicted_accuracy(0.5, 0.5, 0.5, 0), "budget"),
    ("simulation of no episodes", None, lambda m: metrics.simulate_ds(0.5, 0.5, 0.5, 3, 0), "n must"),
    ("a simulated probability above 1", None, lambda m: metrics.simulate_ds(1.5, 0.5, 0.5, 3, 10), "p_s must"),
    ("a simulated budget of 0", None, lambda m: metrics.simulate_ds(0.5, 0.5, 0.5, 0, 10), "budget must"),
    ("a fractional budget", None, lambda m: metrics.predicted_accuracy(0.5, 0.5, 0.5, 2.5), "budget must"),
    ("a negative p_d|W", None, lambda m: metrics.predicted_accuracy(0.5, 0.5, -0.1, None), "p_dw must"),
    ("no bootstrap draws", None, lambda m: metrics.ds_metrics(rollout_of(m), n_boot=0), "n_boot must"),
]


def rollout_of(_):
    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=1, d_model=16, n_heads=2, d_mlp=32, seed=0, task=TASK))
    return rollout(model, q())


@pytest.mark.parametrize("name, which, call, fragment", CASES, ids=[c[0] for c in CASES])
def test_library_bad_input_is_one_clear_value_error(name, which, call, fragment, request):
    model = request.getfixturevalue(which) if which else None
    with pytest.raises(ValueError) as info:
        call(model)
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and len(message) < 400, message


def test_hf_folders_without_a_tokenizer_or_config_are_refused(tmp_path, gpt2):
    folder = hf.save_random("gpt2", tmp_path / "m", WORDS)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match="no tokenizer"):
        hf.boot(folder)
    with pytest.raises(ValueError, match="config.json"):
        hf.boot(tmp_path / "missing")
    with pytest.raises(ValueError, match="architecture"):
        hf.save_random("gemma", tmp_path / "g", WORDS)


def test_an_objective_named_by_a_string_is_one_objective(gpt2):
    _, summary = traces.role_attribution(gpt2, TOKENS, ROLES, objectives="sft_token_mean")
    assert list(summary.objective) == ["sft_token_mean"]


def test_a_model_that_never_writes_the_format_is_reported():
    from tsds_interp.task import EOS

    torch.manual_seed(0)
    model = build_model(ModelConfig(n_layers=2, d_model=32, n_heads=4, d_mlp=64, seed=0, task=TASK))
    with torch.no_grad():  # it writes the end-of-sequence token wherever a digit or a decision is due
        model.state_dict(keep_vars=True)["unembed.bias"][EOS] += 100
    with pytest.warns(UserWarning, match="all 4 episodes are malformed"):
        rollout(model, q(), temperature=1.0, seed=0)

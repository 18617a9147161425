"""TASO: the sparse layer against a dense reference, importance, selection, budget, ablations."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from experiments.adaptation import target_linears
from experiments.budget import count_params
from experiments.methods import PrepareContext, build_method
from experiments.models import load_model, load_tokenizer
from experiments.runner import batch_source, run
from experiments.data import load_split, tokenize
from taso.adapter import load_adapter, merge, save_adapter, sparse_layers, unmerge
from taso.importance import estimate_importance
from taso.layer import SparseLoraLinear
from taso.selection import select_core_regions


def dense_reference(layer: SparseLoraLinear, x: torch.Tensor) -> torch.Tensor:
    """W x + b + M_rows B A M_cols x with the full d_out x d_in update written out."""
    w = layer.base.weight
    delta = torch.zeros_like(w)
    delta[layer.rows.unsqueeze(1), layer.cols.unsqueeze(0)] = layer.scaling * layer.lora_B @ layer.lora_A
    return x @ (w + delta).T + layer.base.bias


def make_layer(seed: int = 0) -> SparseLoraLinear:
    torch.manual_seed(seed)
    base = nn.Linear(24, 16)
    rows, cols = torch.tensor([1, 5, 6, 11]), torch.tensor([0, 3, 9, 17, 20, 23])
    layer = SparseLoraLinear(base, rows, cols, rank=3, alpha=6.0)
    nn.init.normal_(layer.lora_B)  # B = 0 at init would make the check trivial
    return layer


def test_sparse_forward_and_gradients_match_dense_reference() -> None:
    layer = make_layer()
    x = torch.randn(2, 5, 24, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, ref = layer(x), dense_reference(layer, x_ref)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, layer.lora_A, layer.lora_B], upstream)
    ref_grads = torch.autograd.grad(ref, [x_ref, layer.lora_A, layer.lora_B], upstream)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_merge_then_unmerge_restores_weights_exactly() -> None:
    layer = make_layer()
    x = torch.randn(3, 24)
    before = layer.base.weight.detach().clone()
    expected = layer(x).detach()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.base(x), expected, atol=1e-5, rtol=1e-5)  # cost of the base layer only
    layer.unmerge()
    assert torch.equal(layer.base.weight, before)


def test_no_dense_update_is_formed_and_columns_are_gathered() -> None:
    """Every tensor that forward and backward produce, views of the frozen weight aside, is
    smaller than the d_out x d_in matrix (no dense masked update), and the core columns are
    read by an index gather."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self, weight: torch.Tensor) -> None:
            super().__init__()
            self.weight_storage = weight.untyped_storage().data_ptr()
            self.ops: list[tuple[str, int]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN206
            out = func(*args, **(kwargs or {}))
            made = [
                t
                for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.weight_storage
            ]
            numel = max((t.numel() for t in made), default=0)
            self.ops.append((str(func), numel))
            return out

    layer = make_layer()
    layer.base.requires_grad_(False)  # as TASO trains it
    dense = layer.base.weight.numel()
    x = torch.randn(2, 5, 24, requires_grad=True)
    with Record(layer.base.weight) as record:
        layer(x).sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None
    assert max(numel for _, numel in record.ops) < dense, [op for op in record.ops if op[1] >= dense]
    assert any(op.startswith("aten.gather") for op, _ in record.ops)


def test_autocast_computes_in_the_autocast_dtype() -> None:
    layer = make_layer()
    x = torch.randn(2, 5, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), dense_reference(layer, x), atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert layer.lora_A.grad.dtype == torch.float32 and torch.isfinite(layer.lora_A.grad).all()


# ----------------------------------------------------------------------------- model level


@pytest.fixture
def tiny_setup(make_cfg):
    cfg = make_cfg("method=taso", "method.importance_batches=2")
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, "train", cfg.data.dir), cfg.task, tokenizer)
    return cfg, batch_source(train, tokenizer, 8, cfg.seed)


def test_sorted_prefix_batches_hold_the_same_sample_sorted_by_length(make_cfg) -> None:
    cfg = make_cfg("method=taso")
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, "train", cfg.data.dir), cfg.task, tokenizer)
    batches = batch_source(train, tokenizer, 8, 3)
    ids = lambda bs: [tuple(r[m == 1].tolist()) for b in bs for r, m in zip(b["input_ids"], b["attention_mask"])]  # noqa: E731
    plain, sorted_ = list(batches()), list(batches(sorted_prefix=2))
    loader = DataLoader(train, batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(3), collate_fn=DataCollatorWithPadding(tokenizer))
    assert ids(plain) == ids(loader) == ids(batches())  # the plain order is a seeded loader's, every call
    assert len(plain) == len(sorted_) == 3
    assert sorted(ids(plain[:2])) == sorted(ids(sorted_[:2])) and ids(plain[:2]) != ids(sorted_[:2])
    lengths = [len(x) for x in ids(sorted_[:2])]
    assert lengths == sorted(lengths)
    assert ids(plain[2:]) == ids(sorted_[2:])


def context(cfg, batches, rank: int = 1) -> PrepareContext:
    from experiments.budget import lora_param_count

    model = load_model(cfg.model, 2)
    budget = lora_param_count(model, list(cfg.model.target_modules), rank)
    return PrepareContext(list(cfg.model.target_modules), ["classifier"], rank, budget, batches, "seq_cls", cfg.seed)


def fresh_model(cfg) -> nn.Module:
    """The same random tiny model every call (model=tiny has no pretrained weights)."""
    torch.manual_seed(0)
    return load_model(cfg.model, 2)


def importances_of(cfg, batches, source: str = "grad_x_weight", seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = load_model(cfg.model, 2)
    weights = {n: m.weight for n, m in target_linears(model, list(cfg.model.target_modules)).items()}
    return estimate_importance(model, weights, batches, 2, source, seed, torch.device("cpu"))[0]


def test_importance_leaves_weights_untouched(tiny_setup) -> None:
    cfg, batches = tiny_setup
    torch.manual_seed(0)
    model = load_model(cfg.model, 2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = {n: m.weight for n, m in target_linears(model, list(cfg.model.target_modules)).items()}
    scores, used = estimate_importance(model, weights, batches, 2, "grad_x_weight", 0, torch.device("cpu"))
    assert used == 2
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert set(scores) == set(weights) and all(s.shape == weights[n].shape for n, s in scores.items())
    assert all(s.sum() > 0 for s in scores.values())


def test_importance_is_grad_times_weight(tiny_setup) -> None:
    cfg, batches = tiny_setup
    gxw, g = importances_of(cfg, batches), importances_of(cfg, batches, "grad")
    torch.manual_seed(0)
    model = load_model(cfg.model, 2)
    name = next(iter(gxw))
    w = model.get_submodule(name).weight.detach()
    # one batch: |g * w| = |g| * |w|; summed over batches it is bounded by sum|g| * |w|
    assert torch.all(gxw[name] <= g[name] * w.abs() + 1e-6)
    assert not torch.allclose(gxw[name], g[name])


def test_selection_is_deterministic_and_seed_dependent(tiny_setup) -> None:
    cfg, batches = tiny_setup
    imp = importances_of(cfg, batches)
    a = select_core_regions(imp, 0.125, "per_matrix", "rows+cols", seed=0)
    b = select_core_regions(importances_of(cfg, batches), 0.125, "per_matrix", "rows+cols", seed=0)
    assert all(torch.equal(a[n].rows, b[n].rows) and torch.equal(a[n].cols, b[n].cols) for n in a)
    # the selected rows are the top rows by summed importance
    name = next(iter(a))
    top = torch.topk(imp[name].sum(1), len(a[name].rows)).indices.sort().values
    assert torch.equal(a[name].rows, top)
    # with random importance, another seed gives another selection
    r0 = select_core_regions(importances_of(cfg, batches, "random", 0), 0.125, "per_matrix", "rows+cols", 0)
    r1 = select_core_regions(importances_of(cfg, batches, "random", 1), 0.125, "per_matrix", "rows+cols", 1)
    assert any(not torch.equal(r0[n].rows, r1[n].rows) for n in r0)


def test_global_scope_concentrates_budget() -> None:
    # matrix "hot" is 10x more important than "cold": global selection gives it more lines
    gen = torch.Generator().manual_seed(0)
    imp = {"hot": 10 * torch.rand(16, 16, generator=gen), "cold": torch.rand(16, 16, generator=gen), "warm": 3 * torch.rand(16, 32, generator=gen)}
    per = select_core_regions(imp, 0.25, "per_matrix", "rows+cols", 0)
    glob = select_core_regions(imp, 0.25, "global", "rows+cols", 0)
    lines = lambda sel: sum(len(r.rows) + len(r.cols) for r in sel.values())  # noqa: E731
    assert lines(per) == lines(glob) == round(0.25 * 48) + round(0.25 * 64)
    assert len(glob["hot"].rows) + len(glob["hot"].cols) > len(per["hot"].rows) + len(per["hot"].cols)
    for region in glob.values():  # never one-sided
        assert (len(region.rows) == 0) == (len(region.cols) == 0)


@pytest.mark.parametrize("rank", [1, 2, 4])  # r8 and up: R = 8K exceeds tiny's 32-wide matrices (check_block_rank)
def test_trainable_count_matches_budget(tiny_setup, rank: int) -> None:
    cfg, batches = tiny_setup
    ctx = context(cfg, batches, rank)
    model = build_method(cfg.method).prepare(load_model(cfg.model, 2), ctx)
    counts = count_params(model, ["classifier"])
    assert abs(counts["trainable_params"] - ctx.budget_params) <= 0.01 * ctx.budget_params
    assert counts["head_params"] == 66
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or "classifier" in n for n in names)


def test_rank_not_above_budget_rank_is_rejected(tiny_setup) -> None:
    cfg, batches = tiny_setup
    cfg.method.rank = 1
    with pytest.raises(ValueError, match="plain LoRA rank 1"):
        build_method(cfg.method).prepare(load_model(cfg.model, 2), context(cfg, batches, 1))


def test_lr_scaling_sets_adapter_group(tiny_setup) -> None:
    cfg, batches = tiny_setup
    for gamma, expected in ((0.0, 1.0), (0.5, 8**0.5), (1.0, 8.0)):
        cfg.method.lr_gamma = gamma
        method = build_method(cfg.method)
        model = method.prepare(load_model(cfg.model, 2), context(cfg, batches))
        groups = method.param_groups(model, 1e-3, 0.0)
        assert groups[0]["lr"] == pytest.approx(1e-3 * expected) and groups[1]["lr"] == 1e-3
        assert len(groups[0]["params"]) == 24 and len(groups[1]["params"]) == 2


@pytest.mark.parametrize(
    "override", ["method.importance=grad", "method.importance=weight", "method.importance=random", "method.granularity=rows", "method.granularity=cols", "method.scope=global"]
)
def test_each_ablation_changes_the_selection(tiny_setup, override: str) -> None:
    cfg, batches = tiny_setup
    base = build_method(cfg.method)
    base_model = base.prepare(fresh_model(cfg), context(cfg, batches))
    key, value = override.split("=")
    setattr(cfg.method, key.split(".")[1], value)
    other = build_method(cfg.method)
    other_model = other.prepare(fresh_model(cfg), context(cfg, batches))
    a, b = sparse_layers(base_model), sparse_layers(other_model)
    differs = set(a) != set(b) or any(
        not torch.equal(a[n].rows, b[n].rows) or not torch.equal(a[n].cols, b[n].cols) for n in a
    )
    assert differs
    if value == "rows":  # rows still follow importance, columns do not
        assert all(torch.equal(a[n].rows, b[n].rows) for n in a)
    if value == "cols":
        assert all(torch.equal(a[n].cols, b[n].cols) for n in a)


def test_run_stores_map_adapter_and_timing(make_cfg, tiny_setup, tmp_path: Path) -> None:
    cfg = make_cfg("method=taso", "method.importance_batches=2", "trainer.save_model=true")
    results = json.loads(run(cfg, tmp_path / "taso").read_text())
    assert results["status"] == "completed"
    assert results["trainable_params"] == results["budget_params"] == 896
    assert results["importance_time_s"] > 0 and results["taso"]["rho"] == 0.125
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, set_seed

    regions = load_file(str(tmp_path / "taso" / "core_regions.safetensors"))
    assert any(k.endswith(".row_scores") for k in regions)
    # the stored adapter on a fresh copy of the pretrained model (the run's seed) with the
    # trained head reproduces the trained model (saved merged by trainer.save_model)
    trained = AutoModelForSequenceClassification.from_pretrained(tmp_path / "taso" / "model").eval()
    set_seed(cfg.seed)
    fresh = load_model(cfg.model, 2).eval()
    fresh.classifier.load_state_dict(trained.classifier.state_dict())
    batch = next(iter(tiny_setup[1]()))
    batch.pop("labels")
    with torch.no_grad():
        without_adapter = fresh(**batch).logits
        load_adapter(fresh, tmp_path / "taso" / "adapter.safetensors")
        torch.testing.assert_close(fresh(**batch).logits, trained(**batch).logits, atol=1e-5, rtol=1e-5)
        assert (without_adapter - trained(**batch).logits).abs().max() > 1e-5  # beyond the tolerance above: the adapter matters


def test_adapter_roundtrip_and_merge(tiny_setup, tmp_path: Path) -> None:
    cfg, batches = tiny_setup
    torch.manual_seed(0)
    model = build_method(cfg.method).prepare(load_model(cfg.model, 2), context(cfg, batches))
    for layer in sparse_layers(model).values():
        nn.init.normal_(layer.lora_B)
    model.eval()
    batch = next(iter(batches()))
    batch.pop("labels")
    expected = model(**batch).logits
    save_adapter(model, tmp_path / "a.safetensors")
    torch.manual_seed(0)
    fresh = load_model(cfg.model, 2)
    fresh.classifier.load_state_dict(model.classifier.state_dict())
    load_adapter(fresh, tmp_path / "a.safetensors").eval()
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    merge(fresh)
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)
    unmerge(fresh)
    torch.testing.assert_close(fresh(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_trainable_base_and_bias_gradients_match_dense_reference() -> None:
    # TASO freezes the base layer, but the layer stays correct when someone trains it
    layer = make_layer(1)
    x = torch.randn(4, 24, requires_grad=True)
    params = [x, layer.base.weight, layer.base.bias, layer.lora_A, layer.lora_B]
    upstream = torch.randn(4, 16)
    grads = torch.autograd.grad(layer(x), params, upstream)
    ref_grads = torch.autograd.grad(dense_reference(layer, x), params, upstream)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_trainable_count_matches_budget_on_minilm(glue_dir: Path, rank: int) -> None:
    from experiments.budget import lora_param_count
    from experiments.config import compose

    cfg = compose(["model=minilm", "method=taso", "method.importance_batches=1", "logger=none", f"data.dir={glue_dir}"])
    tokenizer = load_tokenizer(cfg.model)
    train = tokenize(load_split(cfg.task, "train", cfg.data.dir), cfg.task, tokenizer)
    model = load_model(cfg.model, 2)
    budget = lora_param_count(model, list(cfg.model.target_modules), rank)
    assert budget == rank * 41472  # docs/papers.md 8.1: MiniLM-L6, all six encoder matrices
    ctx = PrepareContext(list(cfg.model.target_modules), ["classifier"], rank, budget, batch_source(train, tokenizer, 8, 0), "seq_cls", 0)
    adapted = build_method(cfg.method).prepare(model, ctx)
    trainable = count_params(adapted, ["classifier"])["trainable_params"]
    assert abs(trainable - budget) <= 0.01 * budget
    assert len(sparse_layers(adapted)) == 36

"""The pretraining recipe's pieces (acx_ramanujan/training/recipe.py): which parameters Muon takes, Muon's step
against torch's, the shared schedule, and the random windows' rows."""

import pytest
import torch

from acx_ramanujan import RamanujanConfig, RamanujanForCausalLM
from acx_ramanujan.training.pretrain import training_arguments
from acx_ramanujan.training import recipe
from acx_ramanujan.training.recipe import ExpertMuon, Muon, RandomWindows, make_optimizers, make_schedulers

SHAPE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def optimizer_names(model, optimizer) -> set[str]:
    ids = {id(param) for group in optimizer.param_groups for param in group["params"]}
    return {name for name, param in model.named_parameters() if id(param) in ids}


def test_muon_takes_the_decoder_matrices_and_adamw_the_rest():
    model = RamanujanForCausalLM(RamanujanConfig.from_preset("tiny-moe", **SHAPE, num_experts=4, moe_intermediate_size=32))
    adamw, muon, expert_muon = make_optimizers(model, training_arguments(optimizer="muon"))
    assert isinstance(adamw, torch.optim.AdamW) and type(muon) is Muon and isinstance(expert_muon, ExpertMuon)
    projections = ("q_proj", "k_proj", "v_proj", "o_proj")
    assert optimizer_names(model, muon) == {f"model.layers.{layer}.self_attn.{proj}.weight"
                                            for layer in range(2) for proj in projections}
    experts = {f"model.layers.{layer}.mlp.experts.{name}" for layer in range(2) for name in ("gate_up_proj", "down_proj")}
    assert {id(tensor) for tensor, _ in expert_muon.pieces} == {id(model.get_parameter(name)) for name in experts}
    # embeddings, head, norms and router
    assert optimizer_names(model, adamw) == {name for name, _ in model.named_parameters()} - optimizer_names(
        model, muon) - experts
    assert adamw.defaults["betas"] == (0.9, 0.99)
    decayed = {id(p) for p in adamw.param_groups[0]["params"]}
    assert all((p.ndim >= 2) == (id(p) in decayed) for group in adamw.param_groups for p in group["params"])

    dense = RamanujanForCausalLM(RamanujanConfig.from_preset("tiny", **SHAPE))
    _, muon = make_optimizers(dense, training_arguments(optimizer="muon"))
    assert {name.rsplit(".", 2)[-2] for name in optimizer_names(dense, muon)} == {
        *projections, "gate_proj", "up_proj", "down_proj"}
    [only] = make_optimizers(dense, training_arguments(optimizer="adamw"))
    assert optimizer_names(dense, only) == {name for name, _ in dense.named_parameters()}


@pytest.mark.parametrize("optimizer", ["muon", "adamw"])
def test_qk_norm_weights_go_to_adamw_without_weight_decay(optimizer):
    """The q/k norms' 1-D weights are norms: AdamW's undecayed group, never Muon (which would orthogonalize them)."""
    model = RamanujanForCausalLM(RamanujanConfig.from_preset("tiny", **SHAPE, qk_norm=True))
    adamw, *others = make_optimizers(model, training_arguments(optimizer=optimizer, weight_decay=0.1))
    decayed, undecayed = adamw.param_groups
    norms = {f"model.layers.{layer}.self_attn.{norm}.weight" for layer in range(2) for norm in ("q_norm", "k_norm")}
    assert norms <= {name for name, param in model.named_parameters() if any(param is p for p in undecayed["params"])}
    assert undecayed["weight_decay"] == 0.0 and decayed["weight_decay"] == 0.1
    assert not any(norms & optimizer_names(model, other) for other in others)


@pytest.mark.parametrize("nesterov", [True, False])
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_muon_in_bf16_is_torch_muon_and_in_fp32_keeps_its_momentum(shape, adjust_lr_fn, nesterov):
    torch.manual_seed(0)
    start, grads = torch.randn(shape), [torch.randn(shape) for _ in range(3)]
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=nesterov, adjust_lr_fn=adjust_lr_fn)
    params = {name: torch.nn.Parameter(start.clone()) for name in ("torch", "bf16", "fp32")}
    optimizers = {"torch": torch.optim.Muon([params["torch"]], **options),
                  "bf16": Muon([params["bf16"]], ns_dtype=torch.bfloat16, **options),
                  "fp32": Muon([params["fp32"]], ns_dtype=torch.float32, **options)}
    for grad in grads:  # three steps: the later ones go through the momentum buffers
        for name, optimizer in optimizers.items():
            params[name].grad = grad.clone()
            optimizer.step()
    assert torch.equal(params["bf16"], params["torch"])
    assert torch.equal(optimizers["bf16"].state[params["bf16"]]["momentum_buffer"],
                       optimizers["torch"].state[params["torch"]]["momentum_buffer"])
    # fp32: the momentum is the same exact recurrence (the orthogonalization must not write into it), and the
    # update differs from bf16's only by bf16's rounding.
    buffer = torch.zeros(shape)
    for grad in grads:
        buffer.lerp_(grad, 1 - 0.9)
    assert torch.equal(optimizers["fp32"].state[params["fp32"]]["momentum_buffer"], buffer)
    moved = {name: (params[name] - start).detach() for name in ("bf16", "fp32")}
    assert not torch.equal(moved["fp32"], moved["bf16"])
    assert torch.allclose(moved["fp32"], moved["bf16"], rtol=0, atol=0.03 * moved["bf16"].abs().max())


@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_muon_orthogonalizes_many_matrices_together_as_each_alone(ns_dtype):
    """Matrices of one (wide) shape share a batched iteration: tall and wide ones of that shape, and others beside
    them. Each must move exactly as Muon moves it alone (itself torch's, above)."""
    torch.manual_seed(0)
    shapes = [(24, 40), (40, 24), (24, 40), (16, 16), (40, 24), (8, 40)]
    starts = [torch.randn(shape) for shape in shapes]
    grads = [[torch.randn(shape) for shape in shapes] for _ in range(3)]
    options = dict(lr=0.02, weight_decay=0.1, momentum=0.9, adjust_lr_fn="match_rms_adamw", ns_dtype=ns_dtype)
    together = [torch.nn.Parameter(start.clone()) for start in starts]
    alone = [torch.nn.Parameter(start.clone()) for start in starts]
    optimizer, singles = Muon(together, **options), [Muon([param], **options) for param in alone]
    for step_grads in grads:
        for param, single, grad in zip(alone, singles, step_grads):
            param.grad = grad.clone()
            single.step()
        for param, grad in zip(together, step_grads):
            param.grad = grad.clone()
        optimizer.step()
    for batched, single, start in zip(together, alone, starts):
        assert torch.equal(batched, single) and not torch.equal(batched, start)


@pytest.mark.parametrize(("cuda", "avx512_bf16", "amx", "expected"), [
    (None, False, False, torch.float32), (None, True, False, torch.bfloat16), (None, False, True, torch.bfloat16),
    (True, False, False, torch.bfloat16), (False, True, True, torch.float32)])
def test_newton_schulz_runs_in_bf16_only_where_bf16_matmuls_are_native(monkeypatch, cuda, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: cuda)
    device = torch.device("cpu" if cuda is None else "cuda")
    assert recipe.newton_schulz_dtype(device) == expected


def test_expert_muon_steps_each_expert_matrix_as_muon_steps_a_matrix():
    """Against Muon (itself checked against torch.optim.Muon above) on a standalone copy of one expert's up half (gate_up's second half) and down
    matrix; the gradients are zeroed afterwards."""
    torch.manual_seed(0)
    model = RamanujanForCausalLM(RamanujanConfig.from_preset("tiny-moe", **SHAPE, num_experts=4, moe_intermediate_size=32))
    experts = model.model.layers[0].mlp.experts
    [expert_muon] = [opt for opt in make_optimizers(model, training_arguments(optimizer="muon")) if isinstance(opt, ExpertMuon)]
    before = {name: tensor.detach().clone() for name, tensor in experts.named_parameters()}
    tokens = torch.randint(0, 256, (2, 16))
    model(input_ids=tokens, labels=tokens).loss.backward()
    grads = {name: tensor.grad.clone() for name, tensor in experts.named_parameters()}
    for _ in range(2):  # the second step uses the momentum buffers
        expert_muon.step()
    half = experts.gate_up_proj.shape[1] // 2
    for name, index in (("gate_up_proj", (1, slice(half, None))), ("down_proj", (2, slice(None)))):
        reference = torch.nn.Parameter(before[name][index].clone())
        muon = Muon([reference], lr=2e-3, weight_decay=0.1, adjust_lr_fn="match_rms_adamw", ns_dtype=expert_muon.ns_dtype)
        for _ in range(2):
            reference.grad = grads[name][index].clone()
            muon.step()
        assert torch.equal(experts.get_parameter(name).detach()[index], reference.detach()), name
        assert not torch.equal(reference.detach(), before[name][index])
    expert_muon.zero_grad()
    assert experts.gate_up_proj.grad is None and experts.down_proj.grad is None


def test_every_optimizer_follows_the_same_schedule_relative_to_its_peak():
    model = RamanujanForCausalLM(RamanujanConfig.from_preset("tiny", **SHAPE))
    args = training_arguments(max_train_steps=100, optimizer="muon", warmup_ratio=0.05)  # warmup 5 steps, cosine to 0.1x
    optimizers = make_optimizers(model, args)
    schedulers = make_schedulers(args, optimizers)
    peaks = [args.learning_rate, args.muon_learning_rate]
    rates = []
    for _ in range(100):
        rates.append([opt.param_groups[0]["lr"] / peak for opt, peak in zip(optimizers, peaks)])
        for optimizer, scheduler in zip(optimizers, schedulers):
            optimizer.step()  # (no gradients: changes nothing)
            scheduler.step()
    adamw, muon = ([rate[i] for rate in rates] for i in (0, 1))
    assert muon == pytest.approx(adamw, rel=1e-12)
    assert adamw[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert min(adamw[5:]) > 0.1 and optimizers[0].param_groups[0]["lr"] / peaks[0] == pytest.approx(0.1)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_depth_parametrization_scales_the_decoder_layers_learning_rate_and_epsilon(optimizer):
    """depth-μP at L/L0 = 4: the decoder layers' AdamW groups (and Muon) at lr × 1/2 and ε × 1/2 (hidden_optimizer_factors),
    the rest at the base values, through the whole schedule; a step equals torch's AdamW with those values."""
    torch.manual_seed(0)
    model = RamanujanForCausalLM(RamanujanConfig.from_preset(
        "tiny-moe", **{**SHAPE, "num_hidden_layers": 4}, num_experts=4, moe_intermediate_size=32,
        depth_parametrization="depth_mup", depth_base_layers=1))
    args = training_arguments(max_train_steps=20, optimizer=optimizer, warmup_ratio=0.25)
    optimizers = make_optimizers(model, args)
    adamw = optimizers[0]
    hidden = {name for name, _ in model.named_parameters() if ".layers." in name}
    for group in adamw.param_groups:
        names = optimizer_names_of(model, group["params"])
        inside = names <= hidden
        assert inside or not names & hidden  # a group is all decoder-layer parameters or none
        assert group["lr"] == pytest.approx(args.learning_rate * (0.5 if inside else 1))
        assert group["eps"] == pytest.approx(1e-8 * (0.5 if inside else 1))
        assert group["weight_decay"] == (args.weight_decay if all(p.ndim >= 2 for p in group["params"]) else 0.0)
    assert adamw.param_groups[0]["lr"] == args.learning_rate  # the logged learning rate is the base one
    assert set().union(*(optimizer_names(model, o) for o in optimizers[1:])) <= hidden
    for muon in optimizers[1:]:
        assert muon.param_groups[0]["lr"] == pytest.approx(args.muon_learning_rate * 0.5)

    peaks = [[group["lr"] for group in opt.param_groups] for opt in optimizers]
    schedulers = make_schedulers(args, optimizers)
    shares = []
    for _ in range(20):  # every group at the same share of its own peak: warmup to 1, then the cosine down
        step_shares = {group["lr"] / peak for opt, opt_peaks in zip(optimizers, peaks)
                       for group, peak in zip(opt.param_groups, opt_peaks)}
        assert max(step_shares) - min(step_shares) < 1e-12
        shares.append(step_shares.pop())
        for opt, scheduler in zip(optimizers, schedulers):
            opt.step()
            scheduler.step()
    assert shares[:6] == pytest.approx([0.0, 0.2, 0.4, 0.6, 0.8, 1.0]) and shares[-1] < 0.2

    # One AdamW step on a decoder weight is torch's AdamW with lr × 1/2, ε × 1/2, from the same state.
    weight = model.model.layers[2].post_attention_layernorm.weight
    start, grad = weight.detach().clone(), torch.randn_like(weight)
    reference = torch.nn.Parameter(start.clone())
    lr = next(group["lr"] for group in adamw.param_groups if any(p is weight for p in group["params"]))
    expected = torch.optim.AdamW([reference], lr=lr, betas=(args.adam_beta1, args.adam_beta2), eps=0.5e-8,
                                 weight_decay=0.0)
    for opt in optimizers:
        opt.zero_grad()
    adamw.state.clear()
    weight.grad, reference.grad = grad.clone(), grad.clone()
    adamw.step()
    expected.step()
    assert torch.equal(weight.detach(), reference.detach()) and not torch.equal(weight.detach(), start)


def optimizer_names_of(model, params) -> set[str]:
    ids = {id(param) for param in params}
    return {name for name, param in model.named_parameters() if id(param) in ids}


def test_random_windows_are_slices_of_the_stream_fixed_by_seed_and_row():
    stream = torch.arange(10_000)
    windows = RandomWindows(stream, 64, 5000, seed=7)
    rows = [windows[i]["input_ids"] for i in range(len(windows))]
    starts = torch.tensor([int(row[0]) for row in rows])
    assert all(torch.equal(row, stream[start:start + 64]) for row, start in zip(rows, starts.tolist()))
    assert all(torch.equal(windows[i]["labels"], rows[i]) for i in range(10))
    # uniform over every start 0..10000-64, not only the packed blocks' multiples of 64
    assert starts.min() >= 0 and starts.max() <= 10_000 - 64 and (starts % 64 != 0).float().mean() > 0.9
    assert abs(starts.float().mean().item() - (10_000 - 64) / 2) < 200
    # a longer run (a resume with more steps) reads the same first rows; another seed other rows
    longer = RandomWindows(stream, 64, 9000, seed=7)
    assert all(torch.equal(longer[i]["input_ids"], rows[i]) for i in range(5000))
    other = RandomWindows(stream, 64, 5000, seed=8)
    assert sum(torch.equal(other[i]["input_ids"], rows[i]) for i in range(5000)) < 10

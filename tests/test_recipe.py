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
    args = training_arguments(max_train_steps=100, optimizer="muon")  # warmup 5 steps, cosine to 0.1 x the peak
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

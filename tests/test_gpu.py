"""GPU-only paths (skipped without CUDA): calibrated export under bf16 autocast, as the trainer runs it on a GPU."""
import copy

import pytest
import torch

import train_moe as tm
from test_export import BITS
from test_moe import SMALL, randomize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("mode", [{"MLP_MODE": "sparse"}, {"MLP_MODE": "shared_routed"}, {"MLP_MODE": "soft"}])
def test_gpu_calibration_routes_as_the_exported_model(mode):
    cfg = tm.Hyperparameters({**SMALL, **mode, "MODEL_DIM": "64", "EXPERT_HIDDEN": "32"})
    assert cfg.quant_method == "gptq"  # the default on a GPU
    torch.manual_seed(0)
    model = tm.GPT(cfg).cuda()
    randomize(model)
    batches = [(x, torch.roll(x, -1, 1)) for x in torch.randint(0, 64, (3, 32, 16), device="cuda")]
    calibrated = copy.deepcopy(model)
    levels = tm.calibrated_levels(calibrated, cfg, batches, BITS)
    loaded = tm.unpack_artifact(tm.pack_artifact(*tm.quantize_state(model.state_dict(), levels)))
    for name, t in calibrated.state_dict().items():
        assert torch.equal(loaded[name].cuda(), t.float()), name
    fresh = tm.GPT(cfg).cuda()
    fresh.load_state_dict(loaded)
    rounded = tm.GPT(cfg).cuda()
    rounded.load_state_dict(tm.unpack_artifact(tm.pack_artifact(*tm.quantize_state(
        model.state_dict(), tm.rounded_levels(model.state_dict(), BITS, 0.0)))))
    with torch.no_grad(), tm.autocast(torch.device("cuda")):
        reference = [model.logits(x)[0].float() for x, _ in batches]
        errors = [sum((m.logits(x)[0].float() - r).square().mean().item() for (x, _), r in zip(batches, reference))
                  for m in (fresh, rounded)]
    assert errors[0] < 0.8 * errors[1]


def test_gptq_on_the_gpu_matches_the_cpu():
    """Same steps, and the same output error to within float rounding (error feedback may flip a level at a tie)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, 256, generator=g) @ (torch.eye(256) + torch.randn(256, 256, generator=g) / 16)
    w = torch.randn(3, 64, 256, generator=g)
    h = tm.Hessians(3, 256, "cpu")
    for e in range(3):
        h.add(x[e::3], e)
    cpu = tm.quantize_matrix(w, 5, 3.0, h.damped(0.01))
    gpu = tm.quantize_matrix(w.cuda(), 5, 3.0, h.damped(0.01).cuda())
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-3, atol=0)  # row stds may differ in the last bit
    errors = [(x @ (tm.dequantize(q.cpu(), s.cpu(), w.shape) - w).transpose(1, 2)).square().mean() for q, s in (cpu, gpu)]
    assert errors[1] == pytest.approx(errors[0].item(), rel=0.02)


quack_only = pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() != (9, 0)
                                or tm.quack is None, reason="needs an sm90 GPU and quack-kernels (requirements-gpu.txt)")


def routing(tokens: int, experts: int, load: str, g: torch.Generator):
    """Top-2 picks with the last expert empty; `skewed`: expert 3 takes 80% of the first picks."""
    first = torch.randint(0, experts - 1, (tokens,), generator=g)
    if load == "skewed":
        first = torch.where(torch.rand(tokens, generator=g) < 0.8, 3, first)
    second = (first + 1 + torch.randint(0, experts - 2, (tokens,), generator=g)) % (experts - 1)
    idx = torch.stack([first, second], 1).cuda()
    return idx, torch.zeros(experts, device="cuda").scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device="cuda"))


@quack_only
@pytest.mark.parametrize("act", ["relu2", "swiglu"])
@pytest.mark.parametrize("load", ["balanced", "skewed"])
def test_quack_experts_match_the_torch_path(act, load):
    """Output and the gradients of x, the routing weights and both expert weights, bf16 against the torch path's
    bf16 and against fp32: QuACK's error from fp32 within twice the torch path's (plus 1e-3)."""
    g = torch.Generator().manual_seed(0)
    bank = tm.ExpertBank(16, 512, 256, act)
    randomize(bank)
    idx, counts = routing(8192, 16, load, g)
    x, weights, probe = (torch.randn(8192, n, generator=g) for n in (512, 2, 512))
    results = {}
    for kernel, device, dtype in (("torch", "cpu", torch.float32), ("torch", "cuda", torch.bfloat16), ("quack", "cuda", torch.bfloat16)):
        b = copy.deepcopy(bank).to(device)  # the fp32 reference runs on the CPU: CUDA's grouped matmul is bf16 only
        b.kernel = kernel
        xi, wi = x.to(device, dtype).requires_grad_(), weights.to(device).requires_grad_()
        out = b.grouped(xi, idx.to(device), wi, counts.to(device))
        grads = torch.autograd.grad((out * probe.to(device)).sum(), [xi, wi, b.w_in, b.w_out])
        results[kernel, dtype] = [t.float().cuda() for t in (out, *grads)]
    exact = results["torch", torch.float32]
    for i, name in enumerate(["output", "x", "weights", "w_in", "w_out"]):
        err = {k: ((results[k, torch.bfloat16][i] - exact[i]).norm() / exact[i].norm()).item() for k in ("torch", "quack")}
        assert err["quack"] < 2 * err["torch"] + 1e-3, (name, err)
    for grads in (results["quack", torch.bfloat16][3:]):  # the empty expert's weight gradients are zero
        assert grads[15].abs().sum() == 0


@quack_only
@pytest.mark.parametrize("mode", [{"MLP_MODE": "sparse"}, {"MLP_MODE": "shared_routed", "ROUTER": "sigmoid"},
                                  {"MLP_MODE": "sparse", "EXPERT_ACT": "swiglu", "ROUTER": "sqrtsoftplus", "HASH_LAYERS": "1"}])
def test_quack_moe_layer_compiles_whole_and_matches_eager(mode):
    cfg = tm.Hyperparameters({**SMALL, **mode, "MODEL_DIM": "256", "EXPERT_HIDDEN": "128", "NUM_EXPERTS": "8",
                              "EXPERT_KERNEL": "quack"})
    torch.manual_seed(0)
    layer = tm.MoEMLP(cfg, 1).cuda()
    randomize(layer)
    x = torch.randn(4, 512, 256, device="cuda")
    ids = torch.randint(0, 64, (4, 512), device="cuda")

    def step(x):
        with tm.autocast(x.device):
            y, aux = layer(x, ids)
        return y.float().square().mean() + aux

    results = []
    for fn in (step, torch.compile(step, fullgraph=True, dynamic=False)):
        xi = x.clone().requires_grad_()
        loss = fn(xi)
        results.append([loss, *torch.autograd.grad(loss, [xi, *layer.parameters()])])
    for eager, compiled in zip(*results):
        assert ((compiled.float() - eager.float()).norm() / eager.float().norm().clamp_min(1e-12)).item() < 1e-2

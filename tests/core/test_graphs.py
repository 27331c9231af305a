"""core.speed.graphs' bookkeeping on the CPU with a stand-in capture (a "graph" that re-runs the captured
call on the graph's own inputs and writes into the captured outputs, as a CUDA graph replay does);
the real capture on a GPU in the gpu-marked test."""

import pytest
import torch
from torch import nn

from core.speed import graphs


class FakeGraph:
    def __init__(self, run, out):
        self.run, self.out, self.replays = run, out, 0

    def replay(self):
        self.replays += 1
        new = self.run()
        for dst, src in zip(torch.utils._pytree.tree_flatten(self.out)[0], torch.utils._pytree.tree_flatten(new)[0]):
            dst.copy_(src)


def fake_capture(run):
    out = run()
    return FakeGraph(run, out), out


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.calls = 0

    def forward(self, x, scale=1.0, extra=None):
        self.calls += 1
        y = self.lin(x) * scale
        return (y, y + extra) if extra is not None else (y,)


@torch.no_grad()
def test_first_call_eager_second_captured_then_replayed_with_new_inputs():
    net = Net()
    calls = graphs.install({"net": net}, capture=fake_capture)
    gc = calls["net"]
    x1, x2, x3 = torch.randn(3, 2, 4)
    ref = [Net.forward(net, x)[0].clone() for x in (x1, x2, x3)]
    net.calls = 0
    out1 = net(x1)[0].clone()
    assert not gc.graphs and net.calls == 1  # eager, compiles on a GPU
    out2 = net(x2)[0].clone()
    assert len(gc.graphs) == 1 and gc.replays == 1  # captured, then replayed with x2
    out3 = net(x3)
    assert gc.replays == 2 and net.calls == 1 + 1 + 2  # eager, capture, two replays re-run (fake)
    for got, want in zip((out1, out2, out3[0]), ref):
        torch.testing.assert_close(got, want)
    assert out3[0] is gc.graphs[next(iter(gc.graphs))].out[0], "outputs are the graph's own tensors"


@torch.no_grad()
def test_each_call_form_has_its_graph_and_scalars_are_part_of_the_form():
    net = Net()
    gc = graphs.install({"net": net}, capture=fake_capture)["net"]
    x, e = torch.randn(2, 4), torch.randn(2, 4)
    for _ in range(2):
        net(x)
        net(x, scale=0.5)
        net(x, extra=e)
        net(torch.randn(3, 4))
    assert len(gc.graphs) == 4  # two tensor shapes, a scale, an extra input
    torch.testing.assert_close(net(x, scale=0.5)[0], Net.forward(net, x, scale=0.5)[0])
    net(x, scale=0.25)
    net(x, scale=0.25)  # a fifth form: the old graphs are dropped
    assert len(gc.graphs) == 1
    assert graphs.form_of([x, 0.5, None, "a", True]) is not None
    assert graphs.form_of([x, object()]) is None, "a leaf that is not a tensor or a plain value: eager"


@torch.no_grad()
def test_an_input_that_is_another_graphs_output_is_used_without_a_copy():
    a, b = Net(), Net()
    calls = graphs.install({"a": a, "b": b}, capture=fake_capture)
    x = torch.randn(2, 4)
    for _ in range(3):
        y = a(x)[0]
        z = b(y)[0]
    gb = next(iter(calls["b"].graphs.values()))
    assert gb.inputs[0] is y, "b's graph reads a's output tensor directly"
    torch.testing.assert_close(z, Net.forward(b, Net.forward(a, x)[0])[0])


@torch.no_grad()
def test_a_failing_capture_turns_graphs_off_and_runs_eagerly():
    net = Net()

    def broken(run):
        raise RuntimeError("operation not permitted when stream is capturing")

    gc = graphs.install({"net": net}, capture=broken)["net"]
    x = torch.randn(2, 4)
    net(x)
    out = net(x)[0]
    assert gc.disabled.startswith("RuntimeError: operation not permitted") and not gc.graphs
    torch.testing.assert_close(out, Net.forward(net, x)[0])


def test_uninstall_restores_the_forward_underneath():
    net, hooked = Net(), Net()
    hooked.forward = lambda x: ("hook",)  # another wrapper's instance forward
    graphs.install({"net": net, "hooked": hooked}, capture=fake_capture)
    assert graphs.installed(net) is not None and graphs.installed(hooked) is not None
    assert graphs.uninstall({"net": net, "hooked": hooked}) == 2
    assert "forward" not in vars(net) and hooked(torch.zeros(1)) == ("hook",)
    assert graphs.installed(net) is None


@pytest.mark.gpu
@torch.no_grad()
def test_real_cuda_graphs_replay_the_tiny_transformer_exactly():
    from core.demo_model import build_demo_components
    from tests.core.test_fast import transformer_inputs

    tr = build_demo_components()["transformer"].eval().to("cuda")
    kws = []
    for seed in range(4):
        kw = transformer_inputs()
        g = torch.Generator().manual_seed(seed)
        kw["hidden_states"] = torch.randn(kw["hidden_states"].shape, generator=g)
        kws.append({k: v.to("cuda") if isinstance(v, torch.Tensor) else v for k, v in kw.items()})
    ref = [tr(**kw)[0].clone() for kw in kws]
    gc = graphs.install({"tr": tr})["tr"]
    got = [tr(**kw)[0].clone() for kw in kws]
    assert gc.replays == 3 and not gc.disabled
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b)
    graphs.uninstall({"tr": tr})

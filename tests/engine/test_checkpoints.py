"""``PrivacyEngine.save_checkpoint`` / ``load_checkpoint`` and ``accountant.state_dict()`` with Opacus's signatures.

The main test trains two epochs in one go, and one epoch, a checkpoint, fresh objects (another seed, another
initial model) and the second epoch: the parameters must be bitwise equal and epsilon the same, for every
method, which needs the rule's state, the noise generator, the Poisson sampler and the step count restored.
"""

import io
import warnings

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.schedulers import StepGradClip
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from adaclip import PrivacyEngine
from adaclip.methods import METHODS
from adaclip.privacy.accounting import epsilon

N, BATCH, SIGMA, DELTA = 64, 16, 1.0, 1e-3  # four steps per epoch
pytestmark = pytest.mark.usefixtures("float64_by_default")


def _data():
    generator = torch.Generator().manual_seed(11)
    return TensorDataset(torch.randn(N, 6, generator=generator), torch.randint(0, 3, (N,), generator=generator))


def _private(method, *, seed, init_seed=0, accountant="prv"):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    momentum = 0.0 if METHODS[method].releases_step else 0.9  # the Adam rules apply their step with plain SGD
    engine = PrivacyEngine(method=method, accountant=accountant, seed=seed)
    module, optimizer, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.2, momentum=momentum),
        data_loader=DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=SIGMA,
    )
    return engine, module, optimizer, loader


def _train(module, optimizer, loader, epochs, scheduler=None):
    for _ in range(epochs):
        for x, y in loader:
            optimizer.zero_grad()
            nn.functional.cross_entropy(module(x), y).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _parameters(module):
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_resumed_run_equals_the_uninterrupted_one(method, tmp_path):
    engine, module, optimizer, loader = _private(method, seed=5, accountant="rdp")
    _train(module, optimizer, loader, 2)
    expected, expected_epsilon = _parameters(module), engine.get_epsilon(DELTA)

    engine, module, optimizer, loader = _private(method, seed=5, accountant="rdp")
    _train(module, optimizer, loader, 1)
    halfway = _parameters(module)
    engine.save_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer)

    engine, module, optimizer, loader = _private(method, seed=6, init_seed=1, accountant="rdp")
    left = engine.load_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer)
    assert sorted(left) == ["module_state_dict", "privacy_accountant_state_dict"]  # what Opacus returns
    assert torch.equal(_parameters(module), halfway)
    assert optimizer.steps_taken == len(loader) == 4
    _train(module, optimizer, loader, 1)
    assert not torch.equal(_parameters(module), halfway)
    assert torch.equal(_parameters(module), expected)
    assert (
        engine.get_epsilon(DELTA)
        == expected_epsilon
        == epsilon(noise_multiplier=SIGMA, sample_rate=BATCH / N, steps=8, delta=DELTA, accountant="rdp")
    )


def test_each_part_of_the_privacy_state_is_needed_for_the_same_run(tmp_path):
    """Control: without the sampler's state (or the optimizer's: rule state, noise generator) the resumed run
    differs, so the main test can fail."""
    engine, module, optimizer, loader = _private("adaclip", seed=5)
    _train(module, optimizer, loader, 2)
    expected = _parameters(module)
    engine, module, optimizer, loader = _private("adaclip", seed=5)
    _train(module, optimizer, loader, 1)
    engine.save_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer)
    checkpoint = torch.load(tmp_path / "run.pt", weights_only=True)
    for dropped in ("sampling_state_dict", "optimizer_state_dict"):
        partial = {key: value for key, value in checkpoint.items() if key != dropped}
        torch.save(partial, tmp_path / "partial.pt")
        engine, module, optimizer, loader = _private("adaclip", seed=6, init_seed=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the warning for a missing optimizer state is tested below
            engine.load_checkpoint(path=tmp_path / "partial.pt", module=module, optimizer=optimizer)
        _train(module, optimizer, loader, 1)
        assert not torch.equal(_parameters(module), expected), dropped


def test_a_clip_schedulers_bound_is_resumed_with_it(tmp_path):
    engine, module, optimizer, loader = _private("fixed", seed=5)
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.5)
    _train(module, optimizer, loader, 2, scheduler)
    expected = _parameters(module)
    engine, module, optimizer, loader = _private("fixed", seed=5)
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.5)
    _train(module, optimizer, loader, 1, scheduler)
    engine.save_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer, grad_clip_scheduler=scheduler)
    engine, module, optimizer, loader = _private("fixed", seed=6)
    scheduler = StepGradClip(optimizer, step_size=1, gamma=0.5)
    engine.load_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer, grad_clip_scheduler=scheduler)
    assert optimizer.max_grad_norm == 0.5
    _train(module, optimizer, loader, 1, scheduler)
    assert torch.equal(_parameters(module), expected)
    assert optimizer.max_grad_norm == 0.25


def test_the_callers_entries_and_a_file_object_round_trip():
    engine, module, optimizer, loader = _private("quantile", seed=5)
    _train(module, optimizer, loader, 1)
    buffer = io.BytesIO()
    engine.save_checkpoint(path=buffer, module=module, optimizer=optimizer, checkpoint_dict={"epoch": 1})
    buffer.seek(0)
    engine, module, optimizer, loader = _private("quantile", seed=5)
    assert engine.load_checkpoint(path=buffer, module=module, optimizer=optimizer)["epoch"] == 1


def test_accountant_state_dict_has_opacus_shape_and_opacus_reads_it():
    for accountant, opacus_accountant in (("prv", PRVAccountant()), ("rdp", RDPAccountant())):
        engine, module, optimizer, loader = _private("fixed", seed=5, accountant=accountant)
        assert engine.accountant.state_dict() == {"history": [], "mechanism": accountant}
        _train(module, optimizer, loader, 1)
        state = engine.accountant.state_dict()
        assert state == {"history": [(SIGMA, BATCH / N, 4)], "mechanism": accountant}
        opacus_accountant.load_state_dict(state)
        assert opacus_accountant.get_epsilon(DELTA) == pytest.approx(engine.get_epsilon(DELTA), rel=1e-9)


def test_a_history_loaded_before_make_private_is_answered_and_then_continued():
    engine = PrivacyEngine(seed=5)
    engine.accountant.load_state_dict({"history": [(SIGMA, BATCH / N, 0)], "mechanism": "prv"})
    assert engine.get_epsilon(DELTA) == 0.0 and engine.accountant.history == []
    engine.accountant.load_state_dict({"history": [(SIGMA, BATCH / N, 3), (SIGMA, BATCH / N, 2)], "mechanism": "prv"})
    assert engine.get_epsilon(DELTA) == epsilon(noise_multiplier=SIGMA, sample_rate=BATCH / N, steps=5, delta=DELTA)
    model = nn.Linear(6, 3)
    _, optimizer, _ = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(_data(), batch_size=BATCH),
        noise_multiplier=SIGMA,
    )
    assert optimizer.steps_taken == 5 and len(engine.accountant) == 1


@pytest.mark.parametrize(
    "state, match",
    [
        ({"history": []}, "'history' and 'mechanism'"),
        ({"history": [], "mechanism": "rdp"}, "'rdp' accountant, this engine's is 'prv'"),
        ({"history": [(1.0, 0.25, 2), (2.0, 0.25, 2)], "mechanism": "prv"}, "several"),
        ({"history": [(2.0, BATCH / N, 2)], "mechanism": "prv"}, "noise_multiplier=2.0"),
    ],
)
def test_an_accountant_state_this_run_cannot_continue_is_refused(state, match):
    engine, *_ = _private("fixed", seed=5)
    with pytest.raises(ValueError, match=match):
        engine.accountant.load_state_dict(state)


def test_checkpoint_misuse_is_named(tmp_path):
    engine, module, optimizer, loader = _private("fixed", seed=5)
    with pytest.raises(ValueError, match="call make_private first"):
        PrivacyEngine().load_checkpoint(path=tmp_path / "none.pt", module=module)
    x, y = next(iter(loader))  # one step of an epoch of four
    nn.functional.cross_entropy(module(x), y).backward()
    optimizer.step()
    with pytest.warns(UserWarning, match="within an epoch of 4"):
        engine.save_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer)
    before = [p.detach().clone() for p in module.parameters()]
    with torch.no_grad():
        for p in module.parameters():
            p.add_(1.0)
    with pytest.raises(ValueError, match=r"pass optimizer=\.\.\. to load_checkpoint, or a resumed run"):
        engine.load_checkpoint(path=tmp_path / "run.pt", module=module)  # the noise generator would restart
    assert all(torch.equal(p, b + 1.0) for p, b in zip(module.parameters(), before, strict=True))  # nothing restored
    with pytest.raises(ValueError, match="the history counts 0 steps but the model has taken 1"):
        engine.accountant.load_state_dict({"history": [], "mechanism": engine.accountant.mechanism()})
    checkpoint = torch.load(tmp_path / "run.pt", weights_only=True)
    checkpoint["privacy_accountant_state_dict"]["history"] = [(SIGMA, BATCH / N, 7)]
    torch.save(checkpoint, tmp_path / "tampered.pt")
    with pytest.raises(ValueError, match="counts 7 steps but its optimizer state 1"):
        engine.load_checkpoint(path=tmp_path / "tampered.pt", module=module, optimizer=optimizer)


def test_checkpoints_are_refused_in_data_parallel_mode(tmp_path):
    """A checkpoint holds one rank's Poisson sampler: loaded on every rank, the ranks would draw the same pattern
    over their shares and the batch would no longer be Poisson over all N."""
    engine, module, optimizer, _ = _private("fixed", seed=5)
    optimizer.distributed = True  # what make_private sets for a DDP-wrapped model or distributed=True
    with pytest.raises(ValueError, match="save_checkpoint is not supported in data-parallel mode"):
        engine.save_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer)
    with pytest.raises(ValueError, match="load_checkpoint is not supported in data-parallel mode"):
        engine.load_checkpoint(path=tmp_path / "run.pt", module=module, optimizer=optimizer)
    assert not (tmp_path / "run.pt").exists()

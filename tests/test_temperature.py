"""Temperature policies: DTS against hand-computed values of the authors' rule, baselines, CTKD's
learnt temperatures and Annealing-KD's schedule, validation."""

import itertools
import math

import pytest
import torch

from dts_llm import (
    ConstantTemperature,
    CosineTemperature,
    DistillationConfig,
    DynamicTemperature,
)
from dts_llm.losses import TOKEN_FEATURES, distillation_loss
from dts_llm.temperature import (
    AnnealingTemperature,
    GlobalTemperature,
    InstanceTemperature,
    TemperatureContext,
    ctkd_lambda,
    make_temperature_policy,
)

# Gaps d = L_teacher - L_student used below, with a = d / (d + 1 + 1e-4):
#   student 2.0, teacher 1.5: d = -0.5, a = -0.5 / 0.5001  = -0.9998  -> a <= 1, plain cosine target
#   student 4.0, teacher 1.0: d = -3.0, a = -3.0 / -1.9999 =  1.500075 -> 1 < a <= 2, target x a
#   student 2.5, teacher 1.0: d = -1.5, a = -1.5 / -0.4999 =  3.0006  -> a > 2, target x 1.35
LAGGING_LITTLE = (2.0, 1.5)
LAGGING_A_LOT = (4.0, 1.0)
LAGGING_NEAR_ONE = (2.5, 1.0)


def dts(**kwargs):
    return DynamicTemperature(**{"t_init": 3.0, "t_min": 1.0, "t_max": 3.0, "momentum": 0.9, **kwargs})


@pytest.mark.parametrize(
    "ces, progress, expected",
    [
        # S(0.5) = 0.5; target 3 * 0.5 = 1.5; T = 0.9 * 3 + 0.1 * 1.5
        (LAGGING_LITTLE, 0.5, 2.85),
        # target 3 * 0.5 * 1.500075 = 2.2501125; T = 2.7 + 0.22501125
        (LAGGING_A_LOT, 0.5, 2.92501125),
        # target 3 * 0.5 * 1.35 = 2.025; T = 2.7 + 0.2025
        (LAGGING_NEAR_ONE, 0.5, 2.9025),
        # S(0) = 1; target 3 * 1.500075 = 4.500225, clamped to T_max = 3; T = 2.7 + 0.3
        (LAGGING_A_LOT, 0.0, 3.0),
        # S(1) = 0; target 0, clamped to T_min = 1; T = 2.7 + 0.1
        (LAGGING_LITTLE, 1.0, 2.8),
        # student better than teacher: d = 0.5, a = 0.5 / 1.5001 < 1; S(0.25) = 0.853553...; target 2.56066
        ((1.0, 1.5), 0.25, 0.9 * 3 + 0.1 * 3 * (1 + math.sqrt(0.5)) / 2),
    ],
)
def test_dts_single_update_matches_reference_rule(ces, progress, expected):
    policy = dts()
    assert policy.update(*ces, progress) == pytest.approx(expected, abs=1e-9)
    assert policy.temperature == pytest.approx(expected, abs=1e-9)


def test_dts_trajectory_with_momentum_half():
    policy = dts(momentum=0.5)
    steps = [
        (LAGGING_LITTLE, 0.5, 2.25),  # target 1.5:   (3 + 1.5) / 2
        (LAGGING_LITTLE, 1.0, 1.625),  # target T_min: (2.25 + 1) / 2
        (LAGGING_NEAR_ONE, 0.5, 1.825),  # target 2.025: (1.625 + 2.025) / 2
        (LAGGING_A_LOT, 0.0, 2.4125),  # target 4.5 clamped to 3: (1.825 + 3) / 2
    ]
    trajectory = [policy.update(*ces, p) for ces, p, _ in steps]
    assert trajectory == pytest.approx([expected for *_, expected in steps], abs=1e-9)


def test_dts_caps_a_when_gap_approaches_minus_one():
    # d = -1.0002: denominator -1e-4, a ~ 1e4 > 2 -> the 1.35 cap, not a huge temperature
    policy = dts(momentum=0.0, t_max=10.0)
    assert policy.update(2.0002, 1.0, 0.0) == pytest.approx(3 * 1.35)


def test_dts_momentum_zero_follows_target_and_state_round_trips():
    policy = dts(momentum=0.0)
    policy.update(*LAGGING_LITTLE, 0.5)
    assert policy.temperature == pytest.approx(1.5)
    restored = dts(momentum=0.0)
    restored.load_state_dict(policy.state_dict())
    assert restored.temperature == policy.temperature
    assert restored.update(*LAGGING_A_LOT, 0.5) == policy.update(*LAGGING_A_LOT, 0.5)


def test_dts_logs_the_means_of_its_rule_over_the_window_and_starts_a_new_one():
    policy = dts()
    assert policy.logged_values(0.0) == {}  # no update yet
    policy.update(*LAGGING_LITTLE, 0.5)  # d = -0.5, a = -0.5 / 0.5001, S = 0.5
    policy.update(*LAGGING_A_LOT, 0.0)  # d = -3, a = -3 / -1.9999 = 1.500075 fires, S = 1
    a_little, a_lot = -0.5 / 0.5001, -3 / -1.9999
    assert policy.logged_values(0.0) == pytest.approx(
        {"dts_gap": -1.75, "dts_a": (a_little + a_lot) / 2, "dts_fired": 0.5, "dts_cosine": 0.75}
    )
    assert policy.logged_values(0.0) == {}
    policy.update(*LAGGING_A_LOT, 1.0)
    assert policy.logged_values(0.0) == pytest.approx(
        {"dts_gap": -3.0, "dts_a": a_lot, "dts_fired": 1.0, "dts_cosine": 0.0}
    )


@pytest.mark.parametrize(
    "ces, expected_a, fired",
    [
        # the student lags by 0.5 nat: d = +0.5, a = 0.5 / 1.5001 < 1
        (LAGGING_LITTLE, 0.5 / 1.5001, False),
        # lagging by 3 nats, where the reference's branch fires: d = 3, a = 3 / 4.0001, still < 1
        (LAGGING_A_LOT, 3 / 4.0001, False),
        # the student beats the teacher by 2 nats: d = -2, a = -2 / -0.9999 = 2.0002 > 2, capped at 1.35
        ((1.0, 3.0), -2 / -0.9999, True),
    ],
)
def test_dts_paper_takes_the_gap_with_the_papers_sign(ces, expected_a, fired):
    policy = make_temperature_policy("dts_paper", temperature_momentum=0.0)
    step = policy.rule(*ces, 0.5)
    assert (step.gap, step.a, step.fired) == (pytest.approx(ces[0] - ces[1]), pytest.approx(expected_a), fired)
    # S(0.5) = 0.5: target 3 * 0.5 = 1.5, times 1.35 when the branch fires
    assert policy.update(*ces, 0.5) == pytest.approx(1.5 * 1.35 if fired else 1.5)


def test_constant_and_cosine_baselines():
    constant = ConstantTemperature(2.0)
    assert [constant.update(5.0, 1.0, p) for p in (0.1, 0.9)] == [2.0, 2.0]
    cosine = CosineTemperature(t_min=1.0, t_max=3.0)
    assert cosine.temperature == 3.0
    assert [cosine.update(9.0, 1.0, p) for p in (0.0, 0.5, 1.0)] == pytest.approx([3.0, 2.0, 1.0])


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"t_min": 0.0}, "temperature_min"),
        ({"t_min": -1.0}, "temperature_min"),
        ({"t_min": 3.5}, "temperature_min"),
        ({"t_init": 4.0}, "temperature_init"),
        ({"t_init": 0.5}, "temperature_init"),
        ({"momentum": 1.0}, "temperature_momentum"),
        ({"momentum": -0.1}, "temperature_momentum"),
    ],
)
def test_invalid_dts_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field}"):
        dts(**kwargs)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"temperature_min": 0.0}, "temperature_min"),
        ({"temperature_min": 4.0}, "temperature_min"),
        ({"temperature_init": 5.0}, "temperature_init"),
        ({"temperature_momentum": 1.0}, "temperature_momentum"),
        ({"temperature_policy": "linear"}, "temperature_policy must be one of"),
        ({"temperature_progress": "batch"}, "temperature_progress"),
        ({"kd_ratio": 1.5}, "kd_ratio"),
        ({"divergence": "kl"}, "divergence"),
        ({"divergence": "jsd", "jsd_beta": 2.0}, "jsd_beta"),
        ({"divergence": "skew_forward_kl", "skew_lambda": 0.0}, "skew_lambda"),
        ({"kd_chunk_size": 0}, "kd_chunk_size"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
        ({"temperature_policy": "ctkd", "temperature_init": 1.0}, "temperature_init"),
        ({"temperature_policy": "ctkd", "temperature_init": 25.0}, "temperature_init"),
        ({"temperature_policy": "ctkd", "ctkd_t_start": 0.0}, "ctkd_t_start"),
        ({"temperature_policy": "ctkd_instance", "ctkd_t_range": -2.0}, "ctkd_t_range"),
        ({"temperature_policy": "ctkd", "ctkd_lambda_max": -1.0}, "ctkd_lambda_max"),
        ({"temperature_policy": "ctkd", "ctkd_lambda_epochs": -1.0}, "ctkd_lambda_epochs"),
        ({"temperature_policy": "ctkd_instance", "ctkd_hidden_size": 0}, "ctkd_hidden_size"),
        ({"ctkd_learning_rate": 0.0}, "ctkd_learning_rate"),
        ({"teacher_temperature_ratio": 0.0}, "teacher_temperature_ratio"),
        ({"temperature_policy": "ctkd", "teacher_temperature_ratio": 2.0}, "teacher_temperature_ratio"),
        ({"temperature_policy": "dts_token", "temperature_momentum": 1.0}, "temperature_momentum"),
        ({"temperature_policy": "adakd", "temperature_init": 5.0}, "temperature_init"),
        ({"temperature_policy": "annealing", "temperature_max": 0.5}, "temperature_max"),
        ({"temperature_policy": "annealing", "annealing_fraction": 0.0}, "annealing_fraction"),
        ({"temperature_policy": "annealing", "annealing_fraction": 1.5}, "annealing_fraction"),
        ({"temperature_policy": "constant", "temperature_init": "auto"}, "temperature_init"),
        ({"temperature_policy": "annealing", "temperature_min": "auto"}, "temperature_min"),
        ({"temperature_max": "high"}, "temperature_max"),
        ({"temperature_max": "auto", "teacher_cache": "cache"}, "temperature_max"),
        ({"temperature_max": "auto", "auto_temperature_examples": 0}, "auto_temperature_examples"),
        # TrainingArguments takes these; torch would refuse them once both models have loaded.
        ({"learning_rate": -1.0}, "learning_rate"),
        ({"gradient_accumulation_steps": 0}, "gradient_accumulation_steps"),
    ],
)
def test_invalid_config_fails_at_configuration_time(kwargs, field, tmp_path):
    with pytest.raises(ValueError, match=rf"^{field}"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], **kwargs)


def test_the_old_field_names_are_read_with_a_warning(tmp_path):
    with pytest.warns(FutureWarning, match="temperature is deprecated: it is now temperature_policy"):
        config = DistillationConfig(output_dir=str(tmp_path), report_to=[], temperature="cosine", kd_loss="jsd")
    assert (config.temperature_policy, config.divergence) == ("cosine", "jsd")
    assert (config.temperature, config.kd_loss) == (None, None)  # one name per setting from here on
    assert config.temperature_settings()["temperature_policy"] == "cosine"


@pytest.mark.parametrize("value", [0.9, "0.9"])  # from Python, and from `--temperature 0.9`
def test_a_trl_style_temperature_number_is_refused_with_the_new_names(tmp_path, value):
    with pytest.raises(
        ValueError, match=r"^temperature names the temperature policy .* temperature_policy='constant'"
    ):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], temperature=value)


def context(progress=0.5, cross_entropies=None, epoch=0.0, features=None):
    """A context whose costly values fail the test if a policy reads them unasked (None)."""

    def unread(name):
        def fail():
            raise AssertionError(f"the policy read {name}")

        return fail

    return TemperatureContext(
        epoch=epoch,
        progress=lambda: progress,
        cross_entropies=unread("the cross-entropies") if cross_entropies is None else lambda: cross_entropies,
        features=unread("the features") if features is None else lambda: features,
    )


@pytest.mark.parametrize("name", ["constant", "cosine", "annealing", "ctkd"])
def test_policies_that_ignore_the_cross_entropies_never_compute_them(name):
    policy = make_temperature_policy(name)
    expected = policy.current(context())
    stepped = policy.step(context(progress=0.0))
    assert torch.as_tensor(stepped).item() == pytest.approx(torch.as_tensor(expected).item())


def test_the_context_computes_each_costly_value_once():
    calls = []
    shared = TemperatureContext(
        epoch=0.0,
        progress=lambda: 0.5,
        cross_entropies=lambda: calls.append(1) or LAGGING_A_LOT,
        features=lambda: None,
    )
    assert shared.cross_entropies == shared.cross_entropies == LAGGING_A_LOT
    assert calls == [1]


def test_dts_steps_on_the_contexts_cross_entropies_and_keeps_t_without_a_token():
    policy = dts()
    assert policy.step(context(progress=0.5, cross_entropies=LAGGING_A_LOT)) == pytest.approx(2.92501125, abs=1e-9)
    no_token = TemperatureContext(epoch=0.0, progress=lambda: 0.5, cross_entropies=lambda: None, features=lambda: None)
    assert policy.step(no_token) == pytest.approx(2.92501125, abs=1e-9)
    assert policy.current(context()) == policy.temperature


# Three scored tokens (student CE, teacher CE) in sequences 0, 1, 1; their batch means as every process sums them.
TOKEN_CES = torch.tensor([LAGGING_LITTLE, LAGGING_A_LOT, LAGGING_NEAR_ONE])
TOKEN_SEQUENCES = torch.tensor([0, 1, 1])


def instance_context(progress=0.5):
    return TemperatureContext(
        epoch=0.0,
        progress=lambda: progress,
        cross_entropies=lambda: tuple(TOKEN_CES.double().mean(0).tolist()),
        features=lambda: None,
        token_cross_entropies=lambda: (TOKEN_CES, TOKEN_SEQUENCES),
    )


@pytest.mark.parametrize(
    "unit, expected",
    [
        # S(0.5) = 0.5; T_i = 0.5 * 3 + 0.5 * target_i with the tokens' targets 1.5, 3 * 0.5 * 1.500075, 3 * 0.5 * 1.35
        ("token", [2.25, 1.5 + 0.5 * 1.5 * 1.500075, 1.5 + 0.5 * 1.5 * 1.35]),
        # sequence 1's mean CEs (3.25, 1.0): d = -2.25, a = 2.25 / 1.2499 in (1, 2]: target 1.5 a
        ("sequence", [2.25, *[1.5 + 0.5 * 1.5 * 2.25 / 1.2499] * 2]),
    ],
)
def test_instance_dts_gives_each_unit_a_momentum_step_from_the_shared_t(unit, expected):
    policy = make_temperature_policy(f"dts_{unit}", temperature_momentum=0.5)
    temperatures = policy.step(instance_context())
    assert temperatures.tolist() == pytest.approx(expected, abs=1e-6)
    # the shared T moves as dts's: batch means (2.8333, 1.1667), d = -5/3, a = 2.5 > 2: target 1.5 * 1.35
    assert policy.temperature == pytest.approx(1.5 + 0.5 * 1.5 * 1.35)
    assert policy.logged_values(0.0)["dts_a"] == pytest.approx((5 / 3) / (2 / 3 - 1e-4))
    # evaluation starts from the shared T and leaves it; a restored policy continues from it
    restored = make_temperature_policy(f"dts_{unit}", temperature_momentum=0.5)
    restored.load_state_dict(policy.state_dict())
    assert restored.current(instance_context()).tolist() == policy.current(instance_context()).tolist()
    assert restored.step(instance_context(0.0)).tolist() == policy.step(instance_context(0.0)).tolist()
    assert restored.temperature == policy.temperature


def test_adakd_gives_hard_tokens_a_low_t_and_easy_ones_a_high_t():
    policy = make_temperature_policy("adakd", temperature_init=2.0, temperature_min=1.0, temperature_max=4.0)
    # the student's token CEs 2.0, 4.0, 2.5 over their mean 17 / 6: r = 12/17, 24/17, 15/17; T = 2 / r, clamped
    expected = [min(2 * 17 / 12, 4.0), 2 * 17 / 24, 2 * 17 / 15]
    assert policy.step(instance_context()).tolist() == pytest.approx(expected, rel=1e-6)
    assert policy.current(instance_context()).tolist() == pytest.approx(expected, rel=1e-6)
    assert policy.temperature == 2.0  # no state: T_init, the T of an average token


def test_the_instance_temperature_reads_the_features_from_the_context():
    torch.manual_seed(0)
    policy = InstanceTemperature(**CTKD, num_features=len(TOKEN_FEATURES), hidden_size=8)
    features = torch.rand(4, len(TOKEN_FEATURES))
    assert torch.equal(policy.step(context(epoch=2.0, features=features)), policy(2.0, features))


# ---- CTKD ------------------------------------------------------------------------------------

CTKD = dict(t_init=3.0, t_start=1.0, t_range=20.0, lambda_max=1.0, lambda_epochs=10.0)


def test_ctkd_lambda_rises_from_zero_along_a_cosine_then_holds():
    values = [ctkd_lambda(epoch, 1.0, 10.0) for epoch in (0.0, 2.5, 5.0, 10.0, 14.0)]
    assert values == pytest.approx([0.0, (1 - math.cos(math.pi / 4)) / 2, 0.5, 1.0, 1.0])
    assert ctkd_lambda(3.0, 0.4, 0.0) == 0.4  # no ramp: the full weight from the start


def kd_pair(seed: int, scale_student: float, scale_teacher: float):
    """Logits [1, 6, 11] and labels scoring positions 1..4."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(1, 6, 11, generator=g) * scale_student
    teacher = torch.randn(1, 6, 11, generator=g) * scale_teacher
    labels = torch.randint(0, 11, (1, 6), generator=g)
    labels[0, :2] = -100
    return student, teacher, labels


@pytest.mark.parametrize("epoch", [0.0, 2.0, 5.0, 12.0])
def test_the_gradient_reaching_theta_is_reversed_and_scaled_by_lambda(epoch):
    """d loss / d theta through the reversal layer = -lambda(epoch) x the plain chain rule."""
    policy = GlobalTemperature(**CTKD)
    student, teacher, labels = kd_pair(0, 2.0, 4.0)
    temperature = policy(epoch)
    assert temperature.item() == pytest.approx(3.0)
    distillation_loss(student, teacher, labels, temperature=temperature).backward()

    theta = policy.logit.detach().double().requires_grad_(True)
    plain_temperature = 1.0 + 20.0 * torch.sigmoid(theta)
    plain = distillation_loss(student.double(), teacher.double(), labels, temperature=plain_temperature)
    (plain_grad,) = torch.autograd.grad(plain, theta)
    assert abs(plain_grad.item()) > 1e-3
    expected = -ctkd_lambda(epoch, 1.0, 10.0) * plain_grad.item()
    assert policy.logit.grad.item() == pytest.approx(expected, rel=1e-5, abs=1e-12)


def train_temperature(policy, student, teacher, labels, steps=30, epoch=20.0, features=None):
    """Gradient steps on the policy alone, as the trainer's optimizer would take them."""
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    temperatures = []
    for _ in range(steps):
        optimizer.zero_grad()
        temperature = policy(epoch, features)
        temperatures.append(temperature.detach().mean().item())
        distillation_loss(student, teacher, labels, temperature=temperature).backward()
        optimizer.step()
    return temperatures


def kd_slope(student, teacher, labels, at: float) -> float:
    temperature = torch.tensor(at, dtype=torch.float64, requires_grad=True)
    loss = distillation_loss(student.double(), teacher.double(), labels, temperature=temperature)
    (slope,) = torch.autograd.grad(loss, temperature)
    return slope.item()


def test_the_temperature_climbs_where_the_kd_loss_grows_with_it_and_falls_where_it_shrinks():
    # T^2 KL between two random distributions grows with T (here at T = 3); between a uniform
    # teacher and a student with one logit 10 above the rest it peaks near T = 2.4 and then falls.
    rising = kd_pair(1, 3.0, 3.0)
    spiked = torch.zeros(1, 6, 11)
    spiked[..., 0] = 10.0
    falling = (spiked, torch.zeros(1, 6, 11), rising[2])
    assert kd_slope(*rising, at=3.0) > 0 and kd_slope(*falling, at=3.0) < 0

    up = train_temperature(GlobalTemperature(**CTKD), *rising)
    down = train_temperature(GlobalTemperature(**CTKD), *falling)
    assert up[-1] > up[0] + 0.5 and all(b >= a for a, b in itertools.pairwise(up))
    low, high = 2.0, 3.0  # the falling pair's KD loss peaks in between: the adversary's target
    for _ in range(30):
        middle = (low + high) / 2
        low, high = (middle, high) if kd_slope(*falling, at=middle) > 0 else (low, middle)
    assert down[1] < down[0] and down[-1] == pytest.approx(low, abs=0.02)
    assert all(1.0 < t < 21.0 for t in up + down)

    frozen = train_temperature(GlobalTemperature(**CTKD), *rising, epoch=0.0)  # lambda(0) = 0
    assert frozen == pytest.approx([3.0] * len(frozen))


def test_the_instance_temperature_starts_at_t_init_and_learns_per_token():
    torch.manual_seed(0)
    policy = InstanceTemperature(**CTKD, num_features=len(TOKEN_FEATURES), hidden_size=8)
    student, teacher, labels = kd_pair(1, 3.0, 3.0)
    features = torch.rand(4, len(TOKEN_FEATURES))
    start = policy(20.0, features)
    assert start.shape == (4,) and torch.allclose(start, torch.full((4,), 3.0))
    temperatures = train_temperature(policy, student, teacher, labels, steps=15, features=features)
    assert temperatures[-1] > temperatures[0] + 0.5  # the KD loss of this pair grows with T
    spread = policy(20.0, features).detach()
    assert spread.std() > 1e-3  # different tokens, different temperatures
    assert ((spread > 1.0) & (spread < 21.0)).all()


def test_learnt_temperatures_round_trip_their_state():
    settings = {
        "temperature_init": 5.0,
        "ctkd_t_start": 1.0,
        "ctkd_t_range": 20.0,
        "ctkd_lambda_max": 1.0,
        "ctkd_lambda_epochs": 10.0,
        "ctkd_hidden_size": 4,
    }
    policy = make_temperature_policy("ctkd_instance", **settings)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter))
    copy = make_temperature_policy("ctkd_instance", **settings)
    copy.load_state_dict(policy.state_dict())
    features = torch.rand(3, len(TOKEN_FEATURES))
    assert torch.equal(copy(1.0, features), policy(1.0, features))


# ---- Annealing-KD ------------------------------------------------------------------------------


def test_annealing_steps_the_temperature_down_then_hands_over_to_ce():
    policy = AnnealingTemperature(t_max=4.0, fraction=0.5)
    assert (policy.temperature, policy.teacher_scale, policy.distilling) == (4.0, 0.25, True)
    # epoch progress of an 8-epoch run: (epoch + 1) / 8
    trajectory = []
    for epoch in range(8):
        policy.update(9.0, 1.0, (epoch + 1) / 8)
        trajectory.append((policy.temperature, policy.teacher_scale, policy.distilling))
    assert trajectory == [
        (4.0, 0.25, True),
        (3.0, 0.5, True),
        (2.0, 0.75, True),
        (1.0, 1.0, True),
        (1.0, 1.0, False),
        (1.0, 1.0, False),
        (1.0, 1.0, False),
        (1.0, 1.0, False),
    ]
    restored = AnnealingTemperature(t_max=4.0, fraction=0.5)
    restored.load_state_dict(policy.state_dict())
    assert (restored.temperature, restored.distilling) == (1.0, False)


def test_annealing_with_a_fractional_t_max_ends_phase_one_at_one():
    policy = AnnealingTemperature(t_max=2.5, fraction=1.0)
    temperatures = [policy.update(0.0, 0.0, p) for p in (0.1, 0.4, 0.7, 1.0)]
    assert temperatures == [2.5, 1.5, 1.0, 1.0]
    assert policy.distilling

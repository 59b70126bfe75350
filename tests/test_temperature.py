"""Temperature policies: DTS against hand-computed values of the authors' rule, baselines, validation."""

import math

import pytest

from dts_llm import ConstantTemperature, CosineTemperature, DistillationConfig, DynamicTemperature

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
        ({"temperature": "linear"}, "temperature must be one of"),
        ({"temperature_progress": "batch"}, "temperature_progress"),
        ({"kd_ratio": 1.5}, "kd_ratio"),
        ({"kd_loss": "kl"}, "kd_loss"),
        ({"kd_loss": "jsd", "jsd_beta": 2.0}, "jsd_beta"),
        ({"kd_loss": "skew_forward_kl", "skew_lambda": 0.0}, "skew_lambda"),
        ({"kd_chunk_size": 0}, "kd_chunk_size"),
        ({"teacher_dtype": "int8"}, "teacher_dtype"),
    ],
)
def test_invalid_config_fails_at_configuration_time(kwargs, field, tmp_path):
    with pytest.raises(ValueError, match=rf"^{field}"):
        DistillationConfig(output_dir=str(tmp_path), report_to=[], **kwargs)

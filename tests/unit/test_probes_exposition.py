"""Parsing the engine's exposition: values, the passed-through block, bad input."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sentinel.probes.exposition import parse_exposition, sample_values
from tests.unit.fake_engine import vllm_metrics

PROMTOOL = shutil.which("promtool")


def promtool_check(text: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, "check", "metrics"], input=text, text=True, capture_output=True, timeout=30
    )


def test_values_are_summed_over_label_sets_and_skip_buckets():
    text = vllm_metrics(running=2, waiting=1, generation=40) + (
        "# HELP vllm:num_requests_running_x other\n# TYPE vllm:num_requests_running_x gauge\n"
        'vllm:num_requests_running_x{engine="1"} 3\n'
    )
    two_engines = text.replace(
        'vllm:generation_tokens_total{engine="0",model_name="tiny"} 40',
        'vllm:generation_tokens_total{engine="0",model_name="tiny"} 40\n'
        'vllm:generation_tokens_total{engine="1",model_name="tiny"} 2',
    )
    expo = parse_exposition(two_engines)
    assert expo.values["vllm:num_requests_running"] == 2
    assert expo.values["vllm:num_requests_waiting"] == 1
    assert expo.values["vllm:generation_tokens_total"] == 42
    assert expo.values["vllm:e2e_request_latency_seconds_count"] == 5
    assert not any(k.endswith(("_bucket", "_created")) for k in expo.values)
    assert expo.errors == 0


def test_only_engine_families_pass_and_colons_are_renamed():
    expo = parse_exposition(vllm_metrics())
    assert "python_gc" not in expo.text and "process_resident" not in expo.text
    assert "vllm:" not in expo.text
    assert "# TYPE vllm_generation_tokens_total counter" in expo.text
    assert (
        'vllm_e2e_request_latency_seconds_bucket{engine="0",le="+Inf",model_name="tiny"} 5.0'
        in expo.text
    )
    kept = parse_exposition(vllm_metrics(), promtool_names=False)
    assert "# TYPE vllm:generation_tokens_total counter" in kept.text


def test_malformed_lines_are_dropped_and_counted_never_raised():
    garbage = (
        'vllm:num_requests_running{engine="0" 3\n'  # unclosed labels
        "vllm:num_requests_waiting notanumber\n"
        "{}}}} 1\n"
        "# TYPE vllm:weird sparkles\nvllm:weird 1\n"  # unknown type: family dropped
        "\x00\x01binary\n"
        "vllm:ok_gauge 7\n"
    )
    expo = parse_exposition(garbage)
    assert expo.errors == 3  # two broken engine samples, one family of unknown type
    assert expo.values == {"vllm:ok_gauge": 7.0}
    assert "vllm_weird" not in expo.text
    assert parse_exposition("").text == ""


def test_a_family_split_in_two_blocks_keeps_the_first_only():
    text = (
        '# HELP vllm:a A\n# TYPE vllm:a gauge\nvllm:a{x="1"} 1\n'
        "# HELP vllm:b B\n# TYPE vllm:b gauge\nvllm:b 2\n"
        '# HELP vllm:a A again\n# TYPE vllm:a gauge\nvllm:a{x="2"} 5\n'
    )
    expo = parse_exposition(text)
    assert expo.text.count("# TYPE vllm_a gauge") == 1
    assert expo.text.count("# HELP vllm_a") == 1
    assert expo.values["vllm:a"] == 1
    assert expo.errors == 1


def test_openmetrics_input_becomes_text_format():
    om = (
        "# HELP vllm:generation_tokens Number of generation tokens.\n"
        "# TYPE vllm:generation_tokens counter\n"
        'vllm:generation_tokens_total{model_name="tiny"} 12.0 # {trace_id="abc"} 1.0\n'
        'vllm:generation_tokens_created{model_name="tiny"} 1.7e9\n'
        "# HELP vllm:x Something.\n# TYPE vllm:x unknown\n# UNIT vllm:x seconds\nvllm:x 1\n"
        "# EOF\n"
    )
    expo = parse_exposition(om)
    assert "# TYPE vllm_generation_tokens_total counter" in expo.text
    assert 'vllm_generation_tokens_total{model_name="tiny"} 12.0\n' in expo.text
    assert "created" not in expo.text and "EOF" not in expo.text and "UNIT" not in expo.text
    assert "# TYPE vllm_x untyped" in expo.text
    assert expo.values["vllm:generation_tokens_total"] == 12


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_passed_through_block_passes_promtool():
    expo = parse_exposition(vllm_metrics(running=1))
    res = promtool_check(expo.text)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_promtool_rejects_the_colon_names_we_rename():
    """The reason for ops.engine_metric_names: promtool: promtool's lint fails on vllm:* names."""
    res = promtool_check(parse_exposition(vllm_metrics(), promtool_names=False).text)
    assert res.returncode != 0
    assert "should not contain ':'" in res.stdout + res.stderr


REAL = Path(__file__).with_name("data_vllm_metrics.txt")  # vLLM 0.32 CPU, after 1 request


def test_real_vllm_exposition_keeps_every_engine_family():
    expo = parse_exposition(REAL.read_text())
    assert expo.errors == 0
    assert expo.families == REAL.read_text().count("# TYPE vllm:")
    assert expo.values["vllm:num_requests_running"] == 0
    assert expo.values["vllm:generation_tokens_total"] == 5
    # the one non-counter named *_total loses the suffix (promtool's lint)
    assert "# TYPE vllm_iteration_tokens histogram" in expo.text
    assert "vllm_iteration_tokens_bucket{" in expo.text
    assert "vllm_iteration_tokens_total" not in expo.text.replace(
        "vllm_iteration_tokens_total_created", ""
    )


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed")
def test_real_vllm_exposition_passes_promtool_once_passed_through():
    raw = REAL.read_text()
    assert promtool_check(raw).returncode != 0  # vLLM's own output does not
    res = promtool_check(parse_exposition(raw).text)
    assert res.returncode == 0, res.stdout + res.stderr


def test_names_that_collide_after_renaming_keep_the_first_family():
    text = (
        "# HELP vllm:x A gauge.\n# TYPE vllm:x gauge\nvllm:x 1\n"
        "# HELP vllm:x_total A gauge named like a counter.\n# TYPE vllm:x_total gauge\n"
        "vllm:x_total 2\n"
    )
    expo = parse_exposition(text)
    assert expo.text.count("# TYPE vllm_x gauge") == 1 and "vllm_x 1" in expo.text
    assert expo.errors == 1


def test_fast_sample_values_agree_with_the_full_parse_on_real_vllm_output() -> None:
    text = (Path(__file__).with_name("data_vllm_metrics.txt")).read_text()
    values, errors = sample_values(text)
    assert errors == 0
    assert values == parse_exposition(text).values
    assert values["vllm:num_requests_running"] == 0.0
    assert "vllm:generation_tokens_total" in values


def test_fast_sample_values_count_malformed_lines() -> None:
    values, errors = sample_values('vllm:broken{{{ 1\nvllm:ok 2\nvllm:x_bucket{le="1"} 3\n')
    assert values == {"vllm:ok": 2.0} and errors == 1

"""deploy/observability against the daemons: promtool passes real scrapes of orchestratord and
pool-managerd (after tasks ran), the alert rules and their unit tests; and the Grafana dashboard
and the rules name only metrics (and labels) the daemons really export, so they cannot drift apart.

promtool comes from ``tools/get-promtool`` (Debian's prometheus package, extracted into a cache);
without it the promtool tests skip with one line, and the drift check still runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from observability_support import busy_scrapes
from prometheus_client.parser import text_string_to_metric_families
from promtool_support import lint_problems, run

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy" / "observability"
DASHBOARD = DEPLOY / "grafana-dashboard.json"
RULES = DEPLOY / "alerts.yml"


@pytest.fixture
async def scrapes(aiohttp_server, aiohttp_client, tmp_path) -> dict[str, str]:
    orchd, pmd = await busy_scrapes(aiohttp_server, aiohttp_client, tmp_path)
    return {"orchestratord": orchd, "pool-managerd": pmd}


# -- promtool -----------------------------------------------------------------------------------


async def test_promtool_check_metrics_passes_real_scrapes_of_both_daemons(scrapes):
    for daemon, text in scrapes.items():
        assert lint_problems(text) == [], daemon
    # the check can fail: a counter without _total and a camelCase name are problems it reports
    assert lint_problems("# HELP fooBar x\n# TYPE fooBar counter\nfooBar 1\n")


def test_promtool_passes_the_rules_their_unit_tests_and_the_example_config(tmp_path):
    for args in (("check", "rules", "alerts.yml"), ("test", "rules", "alerts.test.yml"),
                 ("check", "config", "prometheus.yml")):
        done = run(*args, cwd=DEPLOY)
        assert done.returncode == 0, f"promtool {' '.join(args)}: {done.stdout}{done.stderr}"
    # the unit tests can fail: with the queue's threshold moved they do
    rules = RULES.read_text()
    broken = rules.replace("orchd_admission_queue_capacity > 0.9", "orchd_admission_queue_capacity > 0.99")
    assert broken != rules
    (tmp_path / "alerts.yml").write_text(broken)
    (tmp_path / "alerts.test.yml").write_text((DEPLOY / "alerts.test.yml").read_text())
    done = run("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0 and "LlamaOrchQueueSaturated" in done.stdout + done.stderr


# -- the dashboard and the rules name what the daemons export -----------------------------------

_AGGREGATION_WORDS = frozenset({
    "sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool", "offset", "inf",
    "nan"})


def _strip(expr: str) -> str:
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)  # string literals (regexes of matchers)
    expr = re.sub(r"\$\{?\w+\}?", "", expr)  # Grafana variables
    return re.sub(r"\[[^\]]*\]", "", expr)  # range selectors


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects."""
    e = re.sub(r"\{[^}]*\}", "", _strip(expr))
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in _AGGREGATION_WORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(m.group())
    return names


def matcher_labels(expr: str) -> list[tuple[str, set[str]]]:
    """(metric, label names of its matchers) for each ``metric{...}`` selector."""
    e = _strip(expr)
    return [(m.group(1), set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", m.group(2))))
            for m in re.finditer(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}", e)]


def grouping_labels(expr: str) -> set[str]:
    """Label names of ``by (...)``/``without (...)``/``on (...)`` clauses."""
    return {label.strip() for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", _strip(expr))
            for label in group.split(",") if label.strip()}


def exported(scrapes: dict[str, str]) -> tuple[set[str], dict[str, set[str]]]:
    """(every sample name the daemons declare, label names seen per sample name)."""
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
                "summary": ("_count", "_sum", "")}
    for text in scrapes.values():
        for family in text_string_to_metric_families(text):
            names.update(family.name + s for s in suffixes.get(family.type, ("",)))
            for sample in family.samples:
                names.add(sample.name)
                labels.setdefault(sample.name, set()).update(sample.labels)
    return names, labels


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        exprs += [t["expr"] for t in panel["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"]).groups()
            exprs.append(f"{metric}{{{label}!=\"\"}}")  # a selector with the label it lists
    return exprs


def rule_exprs() -> list[str]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def test_the_dashboard_is_a_grafana_dashboard_of_the_promised_panels():
    dashboard = json.loads(DASHBOARD.read_text())
    titles = " / ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("queue depth", "admission outcomes", "time to first token by pool", "decode latency by pool",
                  "tokens/s", "pool readiness", "slots", "vram", "circuit breakers", "kv cache"):
        assert topic in titles, topic
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] == "llama-orch"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]


async def test_the_dashboard_and_the_rules_use_only_exported_metrics_and_labels(scrapes):
    names, labels = exported(scrapes)
    exprs = dashboard_exprs() + rule_exprs()
    used = set().union(*(metric_names(e) for e in exprs))
    assert {"queue_depth", "latency_first_token_ms_bucket", "pool_ready", "orchd_pool_breaker_open",
            "kv_cache_usage_ratio", "vram_used_bytes"} <= used  # the parser finds them
    assert used - names == set(), f"metrics no daemon exports: {sorted(used - names)}"
    assert used - labels.keys() == set(), f"metrics the busy cluster left without a sample: {sorted(used - labels.keys())}"
    for expr in exprs:
        for metric, matched in matcher_labels(expr):
            if metric in labels:  # (a series with no sample yet has no labels to compare)
                assert matched <= labels[metric], f"{expr}: {metric} has no label {sorted(matched - labels[metric])}"
        grouped = grouping_labels(expr)
        have = set().union(*(labels.get(m, set()) for m in metric_names(expr))) | {"instance", "job"}
        assert grouped <= have, f"{expr}: grouped by {sorted(grouped - have)}, which none of its metrics carries"


def test_the_expression_parser_finds_names_and_labels():
    expr = ('histogram_quantile(0.99, sum by (pool_id, le) (rate(latency_first_token_ms_bucket{pool_id=~"$pool",'
            'engine=~"a|b"}[$__rate_interval]))) > 2e3 and on(instance) up offset 5m')
    assert metric_names(expr) == {"latency_first_token_ms_bucket", "up"}
    assert matcher_labels(expr) == [("latency_first_token_ms_bucket", {"pool_id", "engine"})]
    assert grouping_labels(expr) == {"pool_id", "le", "instance"}

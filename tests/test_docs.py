"""The docs stay usable: the README is short, every relative link and anchor resolves, and what the
pages state about the code (the minimal recipe, the config fields) matches the code."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml
from transformers import TrainingArguments

from dts_llm import DistillationConfig
from dts_llm.recipe import parse_recipe

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
HEADING = re.compile(r"^#{1,6} +(.+?) *$", re.MULTILINE)


def prose(page: Path) -> str:
    """The page without its fenced code blocks, whose `#` lines are comments, not headings."""
    return FENCE.sub("", page.read_text(encoding="utf-8"))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` and `_` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor of a page; a repeated heading gets `-1`, `-2`, ... as on GitHub."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(prose(page)):
        base = anchor(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def relative_links(page: Path) -> list[str]:
    return [target for target in LINK.findall(prose(page)) if not re.match(r"[a-z]+:", target)]


def test_anchor_follows_github():
    assert anchor("`DistillationConfig` fields") == "distillationconfig-fields"
    assert anchor("Quickstart: the whole pipeline offline") == "quickstart-the-whole-pipeline-offline"
    assert anchor("`dts-llm demo` and `dts-llm quickstart`") == "dts-llm-demo-and-dts-llm-quickstart"


def test_a_missing_file_or_anchor_is_found(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n```bash\n# not a heading\n```\n[a](#title) [b](#not-a-heading) [c](gone.md)\n")
    assert anchors(page) == {"title"}
    assert relative_links(page) == ["#title", "#not-a-heading", "gone.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(page.relative_to(ROOT)) for page in PAGES])
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading with anchor #{fragment} in {linked.name}")
    assert not broken, f"{page.name}: " + "; ".join(broken)


def test_readme_stays_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= 200, f"README.md has {lines} lines: move detail to a page in docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {Path(target.partition("#")[0]).name for target in relative_links(ROOT / "README.md")}
    unlinked = [page.name for page in (ROOT / "docs").glob("*.md") if page.name not in linked]
    assert not unlinked, f"pages the README does not link: {unlinked}"


def test_the_readme_minimal_recipe_parses(tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    block = re.search(r"^```yaml\n(.*?)^```", readme, re.MULTILINE | re.DOTALL).group(1)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(block)
    model, data, _, training = parse_recipe("distill", [str(recipe), "--output_dir", str(tmp_path / "out")])
    fields = yaml.safe_load(block)
    assert model.teacher_model_name_or_path == fields["teacher_model_name_or_path"]
    assert data.dataset == fields["dataset"]
    assert (training.kd_ratio, training.learning_rate) == (fields["kd_ratio"], fields["learning_rate"])


def documented_config_fields() -> set[str]:
    """The field names in python.md's `DistillationConfig` table; `_min` after `temperature_init`
    abbreviates `temperature_min`."""
    page = (ROOT / "docs" / "python.md").read_text(encoding="utf-8")
    table = page.split("## `DistillationConfig` fields", 1)[1].split("\n## ", 1)[0]
    names = set()
    for row in table.splitlines():
        if not row.startswith("| `"):
            continue
        prefix = ""
        for name in re.findall(r"`(\w+)`", row.split("|")[1]):
            if name.startswith("_"):
                names.add(prefix + name)
            else:
                names.add(name)
                prefix = name.rsplit("_", 1)[0]
    return names


def test_the_config_fields_table_lists_every_distillation_field():
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = {f.name for f in dataclasses.fields(DistillationConfig)} - inherited
    assert documented_config_fields() == own

"""The data map: files written, the HTML map works in headless Chromium (hover shows the conversation, no
console errors), and the curriculum orders are permutations in the stated order."""

import json
import os
import shutil

import pytest

from _infer_util import save_run, tiny_model

CHROMIUM = "/usr/bin/chromium"


def _write_convs(path, n, topic):
    rows = [{"messages": [{"role": "user", "content": f"{topic} question {i}?"},
                          {"role": "assistant", "content": f"{topic} answer {i} </script><b>x</b>"}]}
            for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_datamap_files_and_html_in_chromium(tmp_path, tiny_tokenizer):
    from gptstack.cli import main

    run = save_run(tmp_path / "run", tiny_model(tiny_tokenizer), tiny_tokenizer)
    a, b = _write_convs(tmp_path / "cats.jsonl", 12, "cat"), _write_convs(tmp_path / "ships.jsonl", 9, "ship")
    out = tmp_path / "map"
    assert main(["datamap", f"{a},{b}", "--out", str(out), "--embedder", run, "--projection", "tsne"]) == 0
    points = [json.loads(line) for line in (out / "points.jsonl").read_text().splitlines()]
    assert [p["index"] for p in points] == list(range(21))
    assert {p["label"] for p in points} == {"cats", "ships"}
    assert (out / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page_html = (out / "map.html").read_text()
    assert "http://" not in page_html and "https://" not in page_html   # self-contained

    playwright_sync = pytest.importorskip("playwright.sync_api")
    if not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
        pytest.skip("needs the system Chromium")
    problems = []
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1000, "height": 900})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.goto((out / "map.html").as_uri())
        assert "21 conversations" in page.inner_text("#summary")
        assert "cats" in page.inner_text("#legend") and "ships" in page.inner_text("#legend")
        # hover the point nearest the centre: the tooltip shows its conversation (as text, never as HTML)
        box = page.locator("#map").bounding_box()
        xy = page.evaluate("(() => { const c = pts[D.info.centre_index]; return [sx(c.x), sy(c.y)]; })()")
        page.mouse.move(box["x"] + xy[0], box["y"] + xy[1])
        tip = page.inner_text("#tip")
        assert "question" in tip and "</script><b>x</b>" in tip
        page.select_option("#colorby", "distance")
        browser.close()
    assert problems == []


def test_curriculum_orders_are_permutations_in_order():
    from gptstack.data.datamap import curriculum_order
    from gptstack.errors import ConfigError

    d = [0.5, 0.1, 0.9, 0.1, 0.3]
    assert curriculum_order(d, "center-out") == [1, 3, 4, 0, 2]
    assert curriculum_order(d, "outside-in") == [2, 0, 4, 1, 3]   # farthest first, ties by index
    r = curriculum_order(d, "random", seed=3)
    assert sorted(r) == list(range(5)) and r == curriculum_order(d, "random", seed=3)
    assert curriculum_order(d, "easy-first") == [2, 0, 4, 1, 3]     # keys are confidences here
    assert curriculum_order(d, "hard-first") == [1, 3, 4, 0, 2]
    with pytest.raises(ConfigError, match="unknown --order"):
        curriculum_order(d, "sideways")


def test_centroid_distance_is_cosine_to_the_mean_direction():
    import numpy as np

    from gptstack.data.datamap import centroid_distances

    v = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    d = centroid_distances(v)
    assert d[2] == pytest.approx(0.0, abs=1e-9) and d[0] == pytest.approx(1 - np.cos(np.pi / 4))


def test_chat_batches_follow_a_curriculum_every_epoch():
    from gptstack.data.chat import ChatBatches
    from gptstack.errors import ConfigError

    encoded = [([1] * (3 + i), [1] * (3 + i)) for i in range(6)]
    order = [4, 2, 0, 5, 1, 3]
    b = ChatBatches(encoded, 1, 16, seed=0, pack=False, order=order)
    seen = [int((next(b)["position_ids"][0] > 0).sum()) + 1 for _ in range(12)]   # lengths identify items
    assert seen == [len(encoded[i][0]) - 1 for i in order] * 2
    with pytest.raises(ConfigError, match="permutation"):
        ChatBatches(encoded, 1, 16, seed=0, order=[0, 0, 1, 2, 3, 4])


def test_sft_refuses_a_confidence_order_without_a_cartography_file_before_loading_anything():
    from gptstack.config import SFTConfig
    from gptstack.errors import ConfigError

    with pytest.raises(ConfigError, match="--cartography-from"):
        SFTConfig(order="easy-first", seq_len=64).validate()

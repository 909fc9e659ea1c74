"""The executor runs prompts like ComfyUI: dependency order, output-reachable nodes only, cached
outputs reused across runs, ComfyUI's events, errors and interrupts reported, not raised."""
from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from wanflow.nodes.standins import STANDIN_NODES
from wanflow.runtime import io_dirs
from wanflow.runtime.errors import InputValueError
from wanflow.runtime.progress import current_reporter
from wanflow.runtime.schema import Hidden, Input, NodeRegistry, NodeSchema, Output, SchemaNode
from wanflow.runtime.workflow import ExecutionListener, Executor, FanOutListener, RecordingListener

CALLS: Counter = Counter()
ORDER: list[str] = []


def _called(name: str) -> None:
    CALLS[name] += 1
    ORDER.append(name)


class Load(SchemaNode):
    SCHEMA = NodeSchema("Load", "Load", "test", inputs=(Input("name", "STRING"),), outputs=(Output("MODEL"),))

    def execute(self, name: str) -> tuple:
        _called(f"Load:{name}")
        return ({"model": name},)


class Add(SchemaNode):
    SCHEMA = NodeSchema("Add", "Add", "test", inputs=(Input("a", "INT", 0), Input("b", "INT", 0)), outputs=(Output("INT"),))

    def execute(self, a: int, b: int) -> tuple:
        _called(f"Add:{a}+{b}")
        return (a + b,)


class Sample(SchemaNode):
    """Reports progress per step (with a preview) and stops when interrupted, like the sampler."""

    SCHEMA = NodeSchema("Sample", "Sample", "test", inputs=(
        Input("model", "MODEL"),
        Input("steps", "INT", 3, min=1, max=10_000),
        Input("step_seconds", "FLOAT", 0.0, optional=True),
    ), outputs=(Output("LATENT"),))

    def execute(self, model: dict, steps: int, step_seconds: float = 0.0) -> tuple:
        _called(f"Sample:{steps}")
        reporter = current_reporter()
        for step in range(steps):
            reporter.raise_if_interrupted()
            if step_seconds:
                threading.Event().wait(step_seconds)
            reporter.progress(step + 1, steps, torch.zeros(1))
        return ({"model": model["model"], "steps": steps},)


class Show(SchemaNode):
    SCHEMA = NodeSchema("Show", "Show", "test", inputs=(Input("value", "*"),), output_node=True)

    def execute(self, value: Any) -> dict:
        _called("Show")
        return {"ui": {"text": [repr(value)]}, "result": ()}


class Fail(SchemaNode):
    SCHEMA = NodeSchema("Fail", "Fail", "test", inputs=(Input("latent", "LATENT"),), outputs=(Output("LATENT"),))

    def execute(self, latent: Any) -> tuple:
        _called("Fail")
        raise InputValueError("height must be a multiple of 16", node="Fail", input_name="latent")


class Context(SchemaNode):
    SCHEMA = NodeSchema("Context", "Context", "test", hidden=(
        Hidden("prompt", "PROMPT"), Hidden("extra_pnginfo", "EXTRA_PNGINFO"), Hidden("unique_id", "UNIQUE_ID"),
    ), output_node=True)

    def execute(self, prompt: dict, extra_pnginfo: dict, unique_id: str) -> dict:
        _called("Context")
        return {"ui": {"seen": [sorted(prompt), extra_pnginfo, unique_id]}}


class Volatile(SchemaNode):
    SCHEMA = NodeSchema("Volatile", "Volatile", "test", inputs=(Input("key", "STRING"),), outputs=(Output("INT"),))
    fingerprint: Any = "same"

    def execute(self, key: str) -> tuple:
        _called("Volatile")
        return (1,)

    @classmethod
    def IS_CHANGED(cls, key: str) -> Any:  # noqa: N802 - ComfyUI's name
        return cls.fingerprint


NODES = (Load, Add, Sample, Show, Fail, Context, Volatile)


@pytest.fixture(scope="session")
def registry() -> NodeRegistry:
    return NodeRegistry(classes={**{c.SCHEMA.node_id: c for c in NODES}, **STANDIN_NODES})


@pytest.fixture(autouse=True)
def _reset_calls() -> None:
    CALLS.clear()
    ORDER.clear()


def load(name: str = "wan") -> dict:
    return {"class_type": "Load", "inputs": {"name": name}}


def sample(steps: int = 3, model: str = "1", **extra: Any) -> dict:
    return {"class_type": "Sample", "inputs": {"model": [model, 0], "steps": steps, **extra}}


def show(source: str) -> dict:
    return {"class_type": "Show", "inputs": {"value": [source, 0]}}


def pipeline(steps: int = 3) -> dict:
    """Load (1) -> Sample (2) -> Show (3); Add (4) -> Show (5); an unused Load (6)."""
    return {
        "1": load(),
        "2": sample(steps),
        "3": show("2"),
        "4": {"class_type": "Add", "inputs": {"a": 2, "b": 3}},
        "5": show("4"),
        "6": load("unused"),
    }


def test_nodes_run_after_their_inputs_and_each_output_as_soon_as_it_can(registry: NodeRegistry) -> None:
    result = Executor(registry).execute(pipeline(), prompt_id="p1")
    assert result.status == "success"
    assert result.executed == ["1", "2", "3", "4", "5"]
    assert ORDER == ["Load:wan", "Sample:3", "Show", "Add:2+3", "Show"]
    assert result.outputs == {"3": {"text": ["{'model': 'wan', 'steps': 3}"]}, "5": {"text": ["5"]}}
    assert set(result.timings) == set(result.executed)


def test_only_nodes_leading_to_an_output_run(registry: NodeRegistry) -> None:
    result = Executor(registry).execute(pipeline(), prompt_id="p1")
    assert "6" not in result.executed
    assert CALLS["Load:unused"] == 0


def test_outputs_argument_runs_only_those_outputs(registry: NodeRegistry) -> None:
    result = Executor(registry).execute(pipeline(), prompt_id="p1", outputs=["5"])
    assert result.executed == ["4", "5"]


def test_rerun_with_one_changed_widget_recomputes_only_what_depends_on_it(registry: NodeRegistry) -> None:
    executor = Executor(registry)
    executor.execute(pipeline(steps=3), prompt_id="p1")
    CALLS.clear()
    result = executor.execute(pipeline(steps=4), prompt_id="p2")
    assert CALLS == Counter({"Sample:4": 1, "Show": 1})
    assert result.executed == ["2", "3"]
    assert result.cached == ["1", "4", "5"]
    assert result.outputs["5"] == {"text": ["5"]}


def test_identical_rerun_runs_nothing_and_resends_cached_outputs(registry: NodeRegistry) -> None:
    executor = Executor(registry)
    executor.execute(pipeline(), prompt_id="p1")
    CALLS.clear()
    listener = RecordingListener()
    result = executor.execute(pipeline(), prompt_id="p2", listener=listener)
    assert sum(CALLS.values()) == 0
    assert listener.types() == ["execution_start", "execution_cached", "executed", "executed", "execution_success", "executing"]
    assert listener.messages[1][1]["nodes"] == ["1", "2", "3", "4", "5"]
    assert result.outputs == {"3": {"text": ["{'model': 'wan', 'steps': 3}"]}, "5": {"text": ["5"]}}


def test_events_come_in_comfyui_order_and_shapes(registry: NodeRegistry) -> None:
    listener = RecordingListener()
    prompt = {"1": load(), "2": sample(steps=2), "3": show("2")}
    result = Executor(registry).execute(prompt, prompt_id="job", listener=listener)
    assert listener.types() == [
        "execution_start", "execution_cached",
        "executing", "executing", "progress", "progress",
        "executing", "executed",
        "execution_success", "executing",
    ]
    data = [d for _, d in listener.messages]
    assert set(data[0]) == {"prompt_id", "timestamp"}
    assert data[1] == {"nodes": [], "prompt_id": "job", "timestamp": data[1]["timestamp"]}
    assert data[2] == {"node": "1", "display_node": "1", "prompt_id": "job"}
    assert data[5] == {"value": 2, "max": 2, "prompt_id": "job", "node": "2"}
    assert data[7] == {"node": "3", "display_node": "3", "output": {"text": ["{'model': 'wan', 'steps': 2}"]}, "prompt_id": "job"}
    assert data[9] == {"node": None, "prompt_id": "job"}
    assert [node for node, _ in listener.previews] == ["2", "2"]
    assert [t for t, _ in result.messages] == ["execution_start", "execution_cached", "execution_success"]


def test_node_error_is_reported_with_comfyui_fields_and_later_jobs_still_run(registry: NodeRegistry) -> None:
    executor = Executor(registry)
    listener = RecordingListener()
    failing = {"1": load(), "2": sample(), "7": {"class_type": "Fail", "inputs": {"latent": ["2", 0]}}, "3": show("7")}
    result = executor.execute(failing, prompt_id="bad", listener=listener)
    assert result.status == "error"
    assert listener.types()[-2:] == ["execution_error", "executing"]
    message = listener.messages[-2][1]
    assert message["node_id"] == "7" and message["node_type"] == "Fail"
    assert message["executed"] == ["1", "2"]
    assert message["exception_message"] == "height must be a multiple of 16"
    assert message["exception_type"] == "wanflow.runtime.errors.InputValueError"
    assert message["traceback"] and all(isinstance(line, str) for line in message["traceback"])
    assert message["current_inputs"] == {"latent": ["{'model': 'wan', 'steps': 3}"]}
    assert sorted(message["current_outputs"]) == ["1", "2"]
    assert isinstance(result.error.exception, InputValueError)

    CALLS.clear()
    again = executor.execute({"1": load(), "2": sample(), "3": show("2")}, prompt_id="good")
    assert again.status == "success"
    assert CALLS == Counter({"Show": 1})  # what ran before the error stayed cached


def test_interrupt_during_a_slow_node_stops_within_one_step(registry: NodeRegistry) -> None:
    executor = Executor(registry)
    steps_seen: list[int] = []
    step_when_interrupted: list[int] = []
    lock = threading.Lock()  # no progress can be reported between reading the step and interrupting
    reached = threading.Event()

    class Watch(ExecutionListener):
        def on_progress(self, prompt_id: str, node_id: str, value: int, max: int, preview: Any) -> None:  # noqa: A002
            with lock:
                steps_seen.append(value)
            if value == 3:
                reached.set()

    def interrupter() -> None:
        reached.wait(10)
        with lock:
            step_when_interrupted.append(steps_seen[-1])
            executor.interrupt()

    thread = threading.Thread(target=interrupter)
    thread.start()
    recording = RecordingListener()
    prompt = {"1": load(), "2": sample(steps=1000, step_seconds=0.01), "3": show("2")}
    result = executor.execute(prompt, prompt_id="long", listener=FanOutListener(Watch(), recording))
    thread.join()
    assert result.status == "interrupted"
    assert max(steps_seen) <= step_when_interrupted[0] + 1
    assert recording.types()[-2:] == ["execution_interrupted", "executing"]
    assert recording.messages[-2][1] == {
        "prompt_id": "long", "node_id": "2", "node_type": "Sample", "executed": ["1"],
        "timestamp": recording.messages[-2][1]["timestamp"],
    }


def test_executor_interrupt_flag_is_cleared_when_the_next_job_starts(registry: NodeRegistry) -> None:
    executor = Executor(registry)
    executor.interrupt()
    assert executor.execute({"4": {"class_type": "Add", "inputs": {"a": 1, "b": 1}}, "5": show("4")}, prompt_id="n").status == "success"


def test_hidden_inputs_are_supplied_from_the_prompt_and_extra_data(registry: NodeRegistry) -> None:
    extra = {"extra_pnginfo": {"workflow": {"nodes": []}}}
    result = Executor(registry).execute({"9": {"class_type": "Context", "inputs": {}}}, prompt_id="p", extra_data=extra)
    assert result.outputs["9"] == {"seen": [["9"], {"workflow": {"nodes": []}}, "9"]}


def test_is_changed_value_decides_whether_a_node_reruns(registry: NodeRegistry) -> None:
    executor = Executor(registry)
    prompt = {"1": {"class_type": "Volatile", "inputs": {"key": "k"}}, "2": show("1")}
    Volatile.fingerprint = "same"
    executor.execute(prompt, prompt_id="a")
    executor.execute(prompt, prompt_id="b")
    assert CALLS["Volatile"] == 1
    Volatile.fingerprint = "changed"
    executor.execute(prompt, prompt_id="c")
    assert CALLS["Volatile"] == 2
    Volatile.fingerprint = float("nan")
    executor.execute(prompt, prompt_id="d")
    executor.execute(prompt, prompt_id="e")
    assert CALLS["Volatile"] == 4


def test_standins_load_an_image_and_save_it_with_comfyui_names_and_metadata(registry: NodeRegistry, tmp_path: Path) -> None:
    io_dirs.set_io_dirs(input=tmp_path / "in", output=tmp_path / "out", temp=tmp_path / "tmp")
    try:
        (tmp_path / "in").mkdir()
        pixels = np.zeros((4, 6, 4), dtype=np.uint8)
        pixels[..., 0] = 255
        pixels[..., 3] = 255
        pixels[0, 0, 3] = 0
        Image.fromarray(pixels, "RGBA").save(tmp_path / "in" / "red.png")
        prompt = {
            "1": {"class_type": "LoadImage", "inputs": {"image": "red.png"}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "clips/wan"}},
            "3": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
        }
        workflow = {"nodes": [], "links": []}
        result = Executor(registry).execute(prompt, prompt_id="img", extra_data={"extra_pnginfo": {"workflow": workflow}})
        assert result.status == "success"
        assert result.outputs["2"] == {"images": [{"filename": "wan_00001_.png", "subfolder": "clips", "type": "output"}]}
        assert result.outputs["3"]["images"][0]["type"] == "temp"
        saved = Image.open(tmp_path / "out" / "clips" / "wan_00001_.png")
        assert saved.size == (6, 4) and saved.getpixel((1, 1)) == (255, 0, 0)
        assert json.loads(saved.text["prompt"])["2"]["class_type"] == "SaveImage"
        assert json.loads(saved.text["workflow"]) == workflow

        image, mask = STANDIN_NODES["LoadImage"]().execute("red.png")
        assert image.shape == (1, 4, 6, 3) and mask.shape == (1, 4, 6)
        assert mask[0, 0, 0] == 1.0 and mask[0, 1, 1] == 0.0

        second = Executor(registry).execute(prompt, prompt_id="img2")  # a fresh cache: saves again
        assert second.outputs["2"]["images"][0]["filename"] == "wan_00002_.png"
    finally:
        io_dirs.set_io_dirs()

"""Start-up failures explained from the engine's exit status and last lines.

The tails are excerpts of real vLLM 0.32 (CPU) output."""

from __future__ import annotations

import socket

from sentinel.engine.diagnose import (
    LaunchContext,
    describe_exit,
    diagnose,
    last_error_line,
    port_in_use,
)

CTX = LaunchContext(model="/models/nope", host="127.0.0.1", port=8123, python="/venv/bin/python")

BAD_MODEL_TAIL = [
    "(APIServer pid=6082) INFO 11-21 15:05:25 [api_utils.py:286] non-default args: "
    "{'port': 18011, 'model': '/nonexistent/model'}",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/vllm/engine/arg_utils.py", line 914, in '
    "__post_init__",
    "    self.model = get_model_path(self.model, self.revision)",
    "                 ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^",
    '  File "/venv/lib/python3.11/site-packages/huggingface_hub/utils/_validators.py", '
    "line 133, in validate_repo_id",
    "    raise HFValidationError(",
    "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'repo_name' or "
    "'namespace/repo_name': '/nonexistent/model'. Use `repo_type` argument if needed.",
]

PORT_TAIL = [
    "(APIServer pid=6146) INFO 11-21 15:05:39 [api_utils.py:286] non-default args: "
    "{'port': 8123, 'model': '/nonexistent/model'}",
    "Traceback (most recent call last):",
    '  File "/venv/lib/python3.11/site-packages/vllm/entrypoints/launchers/launcher.py", '
    "line 348, in create_server_socket",
    "    sock.bind(addr)",
    "OSError: [Errno 98] Address already in use",
]


def test_bad_model_path_names_the_model() -> None:
    d = diagnose(1, BAD_MODEL_TAIL, CTX, loaded=False)
    assert d.reason == "model_not_found"
    assert "'/models/nope'" in d.cause
    assert "HFValidationError" in d.cause  # the engine's own last error line rides along


def test_port_in_use_names_host_and_port() -> None:
    d = diagnose(1, PORT_TAIL, CTX, loaded=False)
    assert d.reason == "port_in_use"
    assert "port 8123 on 127.0.0.1 is already in use" in d.cause


def test_missing_module_names_the_package_and_interpreter() -> None:
    tail = [
        "Traceback (most recent call last):",
        '  File "<frozen runpy>", line 142, in _get_module_details',
        "ModuleNotFoundError: No module named 'vllm'",
    ]
    d = diagnose(1, tail, CTX, loaded=False)
    assert d.reason == "missing_module"
    assert "'vllm'" in d.cause and "/venv/bin/python" in d.cause


def test_unknown_engine_argument() -> None:
    tail = [
        "usage: api_server.py [-h] ...",
        "api_server.py: error: unrecognized arguments: --no-such-flag",
    ]
    d = diagnose(2, tail, CTX, loaded=False)
    assert d.reason == "bad_engine_args"
    assert "--no-such-flag" in d.cause


def test_out_of_memory() -> None:
    tail = ["(EngineCore pid=3) ERROR torch.OutOfMemoryError: CUDA out of memory. Tried ..."]
    assert diagnose(1, tail, CTX, loaded=True).reason == "out_of_memory"


def test_kv_cache_too_small() -> None:
    tail = ["(EngineCore pid=3) ERROR ValueError: No available memory for the cache blocks."]
    assert diagnose(1, tail, CTX, loaded=False).reason == "insufficient_kv_cache_memory"


def test_killed_by_signal() -> None:
    d = diagnose(-9, ["(APIServer pid=1) INFO serving"], CTX, loaded=True)
    assert d.reason == "killed"
    assert "SIGKILL" in d.cause


def test_plain_crash_carries_the_last_error_line() -> None:
    tail = ["(APIServer pid=1) INFO x", "RuntimeError: something odd", '  File "a.py"']
    d = diagnose(1, tail, CTX, loaded=False)
    assert d.reason == "crashed"
    assert "exited with status 1 during start-up" in d.cause
    assert "RuntimeError: something odd" in d.cause


def test_last_error_line_skips_frames() -> None:
    assert last_error_line(BAD_MODEL_TAIL).startswith("huggingface_hub.errors.HFValidationError")
    assert last_error_line(["all good"]) is None


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with status 0"
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert describe_exit(None) == "exited (status unknown)"


def test_port_in_use_precheck() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert port_in_use("127.0.0.1", port)
    assert not port_in_use("127.0.0.1", port)

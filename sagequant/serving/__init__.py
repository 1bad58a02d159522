"""HTTP serving of compiled models (`sagequant engine start | list | stop`: tools/engine_cli.py).

A separate package from tools/ because it is a long-running service with its own dependencies
(FastAPI, uvicorn, prometheus-client) and threads, not a one-shot compiler tool: app.py (OpenAI-
compatible routes), engine_loop.py (the thread that drives the generation engine), metrics.py,
launch.py (compile or load, bind, run), state.py (pid files of background engines), vllm.py
(hand-off to `vllm serve`).
"""

"""Choosing an array namespace has no side effects: importing refimpl's modules leaves the process's
allocator alone (even on a GPU server); loading a model on the CPU is what tunes it."""

import subprocess
import sys
import textwrap


def test_importing_refimpl_does_not_tune_the_allocator_and_loading_on_the_cpu_does(tiny_chat_model_dir):
    script = textwrap.dedent(f"""
        import refimpl.xp
        calls = []
        refimpl.xp.keep_freed_memory = lambda: calls.append("mallopt")
        import refimpl.generate, refimpl.explain, refimpl.engine, refimpl.sampling
        refimpl.xp.namespace("cpu")
        assert calls == [], calls
        from refimpl.models import load_model
        load_model({str(tiny_chat_model_dir)!r}, "cpu")
        assert calls == ["mallopt"], calls
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)

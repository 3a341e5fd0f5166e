"""Programs that run the layoutc runtime: the CLI front door, demo, bench, doctor, load test.

Nothing here is imported by the runtime or the compiler.
"""

from layoutc.compiler.cli import main

__all__ = ["main"]

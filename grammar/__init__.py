"""The `.layout` grammar (`layout.lark`), shipped as package data."""

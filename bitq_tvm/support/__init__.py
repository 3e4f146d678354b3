"""Small shared helpers: atomic writes, progress, tables, output paths, cache."""

"""Training data: finding images and captions under data_root and turning them into batches.

It stands on its own below trainer/: settings come in as `data.options.DataOptions`, problems the user can fix
go out as `data.errors.DataError`, messages through common/console.py; nothing here imports trainer/ or
train.py (tests/test_imports.py checks).
"""

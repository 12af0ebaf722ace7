"""The front door: the `tinymars` command line (cli.py, one module per extra command in commands/) and the
process supervisor of `tinymars run`. It sits above every other layer and nothing imports it."""

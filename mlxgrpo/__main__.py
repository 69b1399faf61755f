from mlxgrpo.cli.app import run

run()

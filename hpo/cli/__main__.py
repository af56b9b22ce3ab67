"""``python -m hpo.cli``: the ``hpo`` command."""

from hpo.cli import app

if __name__ == "__main__":  # importing the module (pkgutil.walk_packages) runs nothing
    app()

# Sourced by demo.sh and test.sh: make the project-local environment (.venv) when it is
# absent, install the project into it from pyproject.toml, and put it first on PATH.
# Never the system interpreter: current Debian/Ubuntu refuse pip installs there, and a
# package installed by hand would hide a dependency the project forgot to declare.
#   VENV=path   another environment folder (default .venv)
#   EXTRAS=dev  the pyproject extras to install (test.sh: dev; demo.sh: none)
VENV=${VENV:-.venv}
if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))'; then
  echo "densedet needs Python >= 3.10; python3 is $(python3 --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating the environment $VENV (python3 -m venv)"
  python3 -m venv "$VENV" || {
    echo "python3 -m venv failed: on Debian/Ubuntu install it with 'apt-get install python3-venv'" >&2
    exit 1
  }
fi
echo "== installing densedet${EXTRAS:+[$EXTRAS]} into $VENV"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}"
export PATH="$PWD/$VENV/bin:$PATH"
export VIRTUAL_ENV="$PWD/$VENV"

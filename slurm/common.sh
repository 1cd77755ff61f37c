# Sourced by normscale's sbatch scripts: the checkout, its Python, and the site settings of slurm/site.env
# (exported, the environment winning, and mirrored into the SBATCH_* variables that nested sbatch calls read).
# Under sbatch a script runs from a spool copy, so the checkout is NORMSCALE_ROOT or the submission directory.
NORMSCALE_ROOT=${NORMSCALE_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
if [[ ! -f "$NORMSCALE_ROOT/slurm/site.env" ]]; then
  echo "normscale: error: $NORMSCALE_ROOT is not a normscale checkout: submit from the checkout's root or set NORMSCALE_ROOT" >&2
  exit 2
fi
export NORMSCALE_ROOT
while IFS='=' read -r key value; do
  [[ "$key" =~ ^NORMSCALE_[A-Z_]+$ ]] || continue
  [[ -n "${!key+set}" ]] || export "$key=$value"
done < "$NORMSCALE_ROOT/slurm/site.env"
if [[ -n "${NORMSCALE_PARTITION:-}" ]]; then export SBATCH_PARTITION=$NORMSCALE_PARTITION; fi
if [[ -n "${NORMSCALE_ACCOUNT:-}" ]]; then export SBATCH_ACCOUNT=$NORMSCALE_ACCOUNT; fi
if [[ -z "${NORMSCALE_PYTHON:-}" ]]; then
  NORMSCALE_PYTHON=python
  [[ -x "$NORMSCALE_ROOT/.venv/bin/python" ]] && NORMSCALE_PYTHON=$NORMSCALE_ROOT/.venv/bin/python
fi
export NORMSCALE_PYTHON
cd "$NORMSCALE_ROOT"

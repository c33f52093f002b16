"""The README's flag table (`## Command line`) says what txt2img's parser does: every flag is
in it, every flag in it exists, and the plain numeric defaults it states are the parser's."""
import re

from conftest import REPO, SHARED


def _table_rows():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## Command line"):readme.index("### Re-dilation semantics")]
    return [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in section.splitlines() if line.startswith("| `--")]


def _flags(cell):
    return re.findall(r"--[A-Za-z][\w-]*", cell)


def _options(txt2img):
    """{option string: argparse action} of txt2img's parser, the `--no-` negatives left out."""
    return {option: action for action in txt2img.build_parser()._actions
            for option in action.option_strings
            if option.startswith("--") and not option.startswith("--no-") and option != "--help"}


def test_every_flag_is_in_the_table_and_every_table_flag_exists(txt2img):
    documented = {flag for row in _table_rows() for flag in _flags(row[0])}
    options = set(_options(txt2img))
    assert options - documented == set(), "flags missing from README's table"
    assert documented - options == set(), "README's table names flags txt2img does not have"


def test_the_tables_numeric_defaults_are_the_parsers(txt2img):
    """Rows whose default cell is one number a flag (`--H --W --C --f` | 512 512 4 8), before
    any family's own in parentheses (`9.0 (SD 1.x: 7.5, SDXL: 5.0)`)."""
    options, checked = _options(txt2img), 0
    for flag_cell, default_cell, *_ in _table_rows():
        flags, values = _flags(flag_cell), default_cell.split(" (")[0].split()
        if len(flags) != len(values) or not all(re.fullmatch(r"-?\d+(\.\d+)?", v) for v in values):
            continue
        for flag, value in zip(flags, values):
            assert options[flag].default == type(options[flag].default)(value), flag
            checked += 1
    assert checked >= 8  # --steps, --ddim_eta, --scale, --H --W --C --f, --seed, ...


def _documented_commands():
    """Every `python scripts/txt2img.py ...` command of README.md and shellscripts/*.sh, its
    continuation lines joined, as (where, argv): "$@" (the user's extra flags) dropped, other
    shell variables given the script's default (`VAR="${VAR:-default}"`) or a placeholder."""
    for path in [REPO / "README.md", *sorted((REPO / "shellscripts").glob("*.sh"))]:
        yield from _commands_in(path)


def _commands_in(path):
    import shlex

    text = path.read_text()
    defaults = dict(re.findall(r'(\w+)="\$\{\w+:-([^}]*)\}"', text))
    lines, i = text.splitlines(), 0
    while i < len(lines):
        number, line = i + 1, lines[i]
        while line.endswith("\\") and i + 1 < len(lines):  # a continued line
            i += 1
            line = line[:-1] + " " + lines[i]
        i += 1
        if line.strip().startswith("python scripts/txt2img.py"):
            argv = shlex.split(line.strip(), comments=True)[2:]
            yield f"{path.name}:{number}", [
                defaults.get(a.lstrip("$"), "x") if a.startswith("$") else a
                for a in argv if a != "$@"]


def test_documented_commands_parse(txt2img):
    """The seed's commands and ours, as the README and the scripts write them: valid flags
    (with the preset each names) and valid options."""
    commands = dict(_documented_commands())
    assert len(commands) >= 7, commands
    for where, argv in commands.items():
        try:
            txt2img.options_from_args(txt2img.parse_args(argv)).validate()
        except (SystemExit, ValueError) as error:
            raise AssertionError(f"{where}: {error}") from error


def test_the_tables_family_defaults_are_ldm_families(txt2img):
    """`9.0 (SD 1.x: 7.5, SDXL: 5.0)`: the values in parentheses are FAMILY_DEFAULTS' (or the
    parser's, where a family keeps it), and every family default is in the table."""
    from ldm.families import FAMILY_DEFAULTS

    options, seen = _options(txt2img), set()
    names = {"SD 1.x": "sd1", "SDXL": "sdxl"}
    for flag_cell, default_cell, *_ in _table_rows():
        inner = re.search(r"\((.*)\)$", default_cell)
        if not inner or not any(name + ":" in inner.group(1) for name in names):
            continue
        flags = _flags(flag_cell)
        for who, values in re.findall(r"((?:SD 1\.x|SDXL)(?:, (?:SD 1\.x|SDXL))*): ([^,]+)",
                                      inner.group(1)):
            for family in (names[n] for n in who.split(", ")):
                for flag, value in zip(flags, values.split()):
                    name = options[flag].dest
                    default = FAMILY_DEFAULTS[family].get(name, options[flag].default)
                    assert type(default)(value) == default, (family, flag)
                    seen.add((family, name))
    assert seen >= {(f, name) for f, d in FAMILY_DEFAULTS.items() for name in d}


def test_the_seed_script_samples_as_the_seeds_command(txt2img):
    """shellscripts/sample_1024x1024.sh samples what the seed README's command samples: the same
    model files and every sampling and re-dilation value. Only the prompt (the seed's script
    has its own), where images go, the device (ours picks CUDA where there is one) and what the
    seed's command adds for its tiling section (batch counts, tiles) differ; those are the
    user's to add."""
    (seed,) = [argv for _, argv in _commands_in(SHARED / "seed" / "scalecrafter-README.md")]
    (ours,) = [argv for _, argv in _commands_in(REPO / "shellscripts" / "sample_1024x1024.sh")]
    seed, ours = vars(txt2img.parse_args(seed)), vars(txt2img.parse_args(ours))
    flags = {action.dest for action in txt2img.build_parser()._actions} - {"help"}
    differing = {name for name in flags if seed[name] != ours[name]}
    assert differing == {"prompt", "outdir", "device", "n_iter", "n_samples", "tiled_decoding",
                         "sync_gn"}, differing
    assert (ours["n_iter"], ours["n_samples"], ours["device"]) == (3, 3, "auto")

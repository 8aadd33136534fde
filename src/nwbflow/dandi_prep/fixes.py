"""Every upload blocker with the exact fix: one table, check id -> what to change.

Check ids are dandi's (``dandi validate`` / ``dandi upload``, dandi-cli 0.81):
``NWBI.<nwbinspector check>`` with nwbinspector's DANDI configuration,
``pynwb.<error>`` for NWB schema validation, ``DANDI.<layout rule>``; and ours,
``nwbflow.<rule>``, for what only shows across files. ``meta.yaml`` hints are
added to processed files (the only ones patched), a "raw files are never
changed" note to raw ones.

Examples
--------
>>> from nwbflow.nwb_io.validate import Finding
>>> finding = Finding("nwbinspector", "ERROR", "NWBI.check_subject_age", "general/subject",
...                   "Subject age, '90 days', does not follow ISO 8601 duration format")
>>> fix = problem_for(finding, kind="processed", subject_id="m1", session="s1", age="90 days").fix
>>> fix.split(" (")[0]
"set Subject.age to an ISO 8601 duration: 'P90D', not '90 days'"
>>> fix.split(" (")[1]
'or supply it in meta.yaml: subjects.m1.age: P90D; it is written into the processed copy only)'
"""

from __future__ import annotations

from dataclasses import dataclass

from nwbflow.dandi_prep.model import PROCESSED, Problem
from nwbflow.nwb_io.dandi_facts import SUBJECT_FIELDS
from nwbflow.nwb_io.validate import METADATA_EXTRACTION_CHECK, Finding, blocks

RAW_NOTE = ("raw files are never changed here: fix it where the raw file is written (e.g. the converter's "
            "metadata) and convert again")
NEW_ID_FIX = ("give each file its own NWBFile.identifier and object id: keep one copy under ROOT, or write "
              "one file again as a new export (pynwb `nwbfile.generate_new_id()` and a new identifier; "
              "nwbflow's processed files get both)")


@dataclass(frozen=True)
class Rule:
    """How to fix one check: ``fix`` (formatted with subject_id, session, age), the ``meta.yaml``
    entry that can supply it for a processed copy, and the Subject fields it flags."""

    fix: str
    meta: str = ""
    fields: tuple[str, ...] = ()


RULES: dict[str, Rule] = {
    "NWBI.check_subject_exists": Rule(
        "add a Subject with subject_id, species, sex (M/F/U/O) and age (e.g. P90D) or date_of_birth",
        "sessions.{session}.subject_id: <id> and subjects.<id>: {{species: Mus musculus, sex: M, age: P90D}}",
        SUBJECT_FIELDS),
    "NWBI.check_subject_id_exists": Rule("set Subject.subject_id, e.g. 'mouse-001'",
                                         "sessions.{session}.subject_id: mouse-001", ("subject_id",)),
    "NWBI.check_subject_id_no_slashes": Rule("set Subject.subject_id without '/', e.g. 'mouse-001'"),
    "NWBI.check_subject_sex": Rule("set Subject.sex to one of M, F, U (unknown), O (other)",
                                   "subjects.{subject_id}.sex: U", ("sex",)),
    "NWBI.check_subject_species_exists": Rule("set Subject.species, e.g. 'Mus musculus'",
                                              "subjects.{subject_id}.species: Mus musculus", ("species",)),
    "NWBI.check_subject_species_form": Rule(
        "set Subject.species as a Latin binomial ('Mus musculus') or an NCBI taxon IRI "
        "('http://purl.obolibrary.org/obo/NCBITaxon_10090')",
        "subjects.{subject_id}.species: Mus musculus", ("species",)),
    "NWBI.check_subject_age": Rule("set Subject.age, e.g. P90D (ISO 8601 duration), or Subject.date_of_birth",
                                   "subjects.{subject_id}.age: P90D", ("age", "date_of_birth")),
    "NWBI.check_subject_proper_age_range": Rule("set Subject.age as an increasing range, e.g. P60D/P90D",
                                                "subjects.{subject_id}.age: P60D/P90D", ("age",)),
    "NWBI.check_subject_weight": Rule("set Subject.weight as '<number> <unit>', e.g. '0.025 kg'",
                                      "subjects.{subject_id}.weight: 0.025 kg", ("weight",)),
    "NWBI.check_session_id_no_slashes": Rule("set NWBFile.session_id without '/', e.g. 'session-1'"),
    METADATA_EXTRACTION_CHECK: Rule("make the file readable by pynwb with its cached namespaces (write it "
                                    "again with a current pynwb/NeuroConv); dandi needs its metadata"),
    "nwbflow.duplicate_identifier": Rule(NEW_ID_FIX),
    "nwbflow.duplicate_object_id": Rule(NEW_ID_FIX),
    "nwbflow.names_not_unique": Rule("give the files distinct session_id values, or keep one of them"),
}
TIMEZONE_RULE = Rule("give {location} a UTC offset, e.g. 2024-01-02T03:04:05-05:00",
                     "sessions.{session}.utc_offset: '-05:00'")


def rule_for(check: str, message: str = "") -> Rule | None:
    """The rule of a check id; the timezone rule for pynwb's "missing required timezone" errors."""
    if check.startswith("pynwb.") and "timezone" in message.lower():
        return TIMEZONE_RULE
    return RULES.get(check)


def flagged_fields(findings: tuple[Finding, ...] | list[Finding]) -> set[str]:
    """Subject fields the blocking findings flag (meta.yaml may replace these)."""
    return {name for f in findings if blocks(f) for name in
            (RULES[f.check].fields if f.check in RULES else ())}


def problem_for(finding: Finding, *, kind: str, subject_id: str, session: str, age: str | None = None) -> Problem:
    """A finding as a Problem with its fix text.

    Parameters
    ----------
    finding : from :func:`nwbflow.nwb_io.validate.dandi_upload_findings`.
    kind : "raw" or "processed" (meta.yaml hints go to processed files, the raw note to raw ones).
    subject_id, session : fill the meta.yaml hint ("<subject_id>" when unknown).
    age : the file's Subject.age, to suggest its ISO 8601 spelling.
    """
    rule = rule_for(finding.check, finding.message)
    blocking = blocks(finding)
    if rule is None:
        fix = _generic_fix(finding)
    else:
        fix = rule.fix.format(location=_datetime_name(finding.location), session=session or "<session_id>",
                              subject_id=subject_id or "<subject_id>")
        if finding.check == "NWBI.check_subject_age" and age:
            fix = _age_fix(age)
        if blocking and rule.meta:
            fix += (f" (or supply it in meta.yaml: {_meta_hint(rule, subject_id, session)}; it is written into "
                    "the processed copy only)" if kind == PROCESSED else f" ({RAW_NOTE})")
    return Problem(check=finding.check, message=finding.message, fix=fix, location=finding.location,
                   blocking=blocking)


def _meta_hint(rule: Rule, subject_id: str, session: str) -> str:
    hint = rule.meta.format(subject_id=subject_id or "<subject_id>", session=session or "<session_id>")
    return hint.replace("{{", "{").replace("}}", "}")


def _age_fix(age: str) -> str:
    """The age fix, with dandi's own reading of the value as the suggestion when it has one."""
    try:
        from dandi.metadata.util import parse_age

        iso, _reference = parse_age(age)
    except ValueError:
        return f"set Subject.age to an ISO 8601 duration, e.g. P90D, instead of {age!r} (or set date_of_birth)"
    return f"set Subject.age to an ISO 8601 duration: {iso!r}, not {age!r}"


def _datetime_name(location: str) -> str:
    name = location.split("(")[0].strip().removeprefix("root/") or "the datetime"
    return {"session_start_time": "NWBFile.session_start_time",
            "timestamps_reference_time": "NWBFile.timestamps_reference_time",
            "file_create_date": "NWBFile.file_create_date"}.get(name, name)


def _generic_fix(finding: Finding) -> str:
    where = f" at {finding.location}" if finding.location else ""
    if finding.check.startswith("pynwb."):
        return (f"make the object{where} conform to the NWB schema (pynwb.validate says: {finding.message}); "
                "writing the file again with a current pynwb/NeuroConv usually does it")
    if finding.check.startswith("NWBI."):
        name = finding.check.removeprefix("NWBI.")
        return (f"fix what nwbinspector's {name!r}{where} reports (its documentation: "
                "https://nwbinspector.readthedocs.io/en/dev/best_practices/best_practices_index.html)")
    if finding.check.startswith("DANDI."):
        return "organize the file under DANDI's layout (sub-<subject>/sub-<subject>_ses-<session>_....nwb)"
    return f"see the message{where}: {finding.message}"


def duplicate_problems(pairs: list[tuple[str, str, str]]) -> list[Problem]:
    """Problems for ``(check, value, other files)`` triples of shared identifiers / object ids."""
    out = []
    for check, value, others in pairs:
        what = "identifier" if check.endswith("identifier") else "object id"
        out.append(Problem(check=check, message=f"NWBFile {what} {value!r} is also the {what} of {others}: "
                                                "DANDI needs every asset to be its own file", fix=RULES[check].fix))
    return out

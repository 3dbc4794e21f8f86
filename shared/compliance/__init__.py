"""Compliance boundaries (issue 5): registries, sign-off chains, e-signatures, contract versions.

The validate stage first applies the contract's own rules (`shared.contract.check_rules`), then
`Compliance.judge`: the record against the registries (`config/registries/`), the box's history
(parts installed, aircraft hours and cycles, in the validate stage's LMDB) and the active
contract version. Everything is judged on the UTC day of `occurred_at`; a date named as a
validity end (certificate `expires`, `calibration_due`, `registration_expires`,
`airworthiness_review_expires`, authorisation `valid_until`) is still valid on that day and
not on the next.

Rule ids (stable; in receipts and DLQ reports, like the contract's):

===============================  ===========================  =========================================
rule                             path                         meaning
===============================  ===========================  =========================================
technician_unknown               $.technician.cert_no         not in the technician registry
                                 ($.inspector.cert_no)
technician_suspended             $.technician.cert_no         suspended on the day of the work
technician_cert_kind             $.technician.cert_kind       the registry holds no such certificate
                                                              for this person
certificate_not_valid            $.technician.cert_kind       certificate not yet issued or expired on
                                                              the day of the work
ata_not_authorised               $.ata                        no authorisation covering the chapter on
                                                              that day (or none to maintain in it)
action_not_authorised            $.action                     authorised for the chapter but not for
                                                              this maintenance action
rts_not_authorised               $.return_to_service          no certifying authorisation for the
                                                              chapter
rts_certificate                  $.technician.cert_kind       the certificate cannot release this
                                                              chapter (FAA-AP/IA any; FAA-A airframe,
                                                              FAA-P powerplant; EASA-B1 non-avionics,
                                                              EASA-B2 avionics/electrical, EASA-C any)
inspection_not_authorised        $.inspection_type            no inspection authorisation for the
                                 ($.inspector.cert_no)        chapter
inspection_certificate           $.technician.cert_kind       ANNUAL and PROGRESSIVE need FAA-IA, 100HR
                                 ($.inspector.cert_kind)      FAA-AP or FAA-IA, the others a kind that
                                                              may release the chapter
rii_inspector_missing            $.inspector                  an RII inspection without its inspector
rii_same_person                  $.inspector.cert_no          the RII inspector did the work himself
rii_not_authorised               $.inspector.cert_no          the inspector holds no RII designation
signature_missing                $.technician.signature       a sign-off (return to service, any
                                 ($.inspector.signature)      inspection, the RII inspector) unsigned
signature_malformed              ...signature                 not base64 of 64 bytes
signature_key_unknown            ...signature                 no e-signature key registered for them
signature_invalid                ...signature                 does not verify under their registered
                                                              key: another key, or an altered record
aircraft_unknown                 $.aircraft.registration      not in the aircraft registry
aircraft_serial_mismatch         $.aircraft.serial_number     not the serial registered to it
aircraft_type_mismatch           $.aircraft.type              not the type registered for it
registration_expired             $.aircraft.registration      registration expired before the work
airworthiness_review_expired     $.aircraft                   return to service of an aircraft whose
                                                              airworthiness review has lapsed (work and
                                                              inspections on it are still recorded:
                                                              that is how a review is renewed)
tool_unknown                     $.tool.serial_number         not in the tool registry
tool_calibration_expired         $.tool.serial_number         registry calibration due before the day
part_already_installed           $.part.serial_number         installed while the box knows it is
                                                              installed (here or on another aircraft)
part_not_installed               $.part.serial_number         removed while the box knows it is not
                                                              installed on this aircraft
part_life_limit_exceeded         $.part.csn, $.part.tsn_hours a life-limited part at or past its limit
                                                              installed or received serviceable
part_life_unknown                $.part.csn, $.part.tsn_hours a life-limited part without the count its
                                                              limit is expressed in
aircraft_hours_decreased         $.aircraft_hours             less than an earlier reading (or more than
                                                              a later one) for the same airframe
aircraft_cycles_decreased        $.aircraft_cycles            the same for cycles
schema_required                  the field                    the active contract version requires it
schema_pattern                   the field                    ... tightens its pattern
schema_enum                      the field                    ... narrows its allowed values
schema_max_length                the field                    ... shortens its maximum length
===============================  ===========================  =========================================

Flags (accepted, logged with the record's COMPLIANCE_CHECKED transition): `part_removal_unknown`,
the removal of a serial the box has never seen installed (it may predate the box).
"""

from shared.compliance.registry import Registry, RegistryError, RegistrySource, load_registry
from shared.compliance.rules import STATE_TABLES, Compliance, MemoryState, Verdict
from shared.compliance.versions import BASE, ContractVersion, DefinitionError, compile_version, dry_run

RULES: tuple[str, ...] = (
    "technician_unknown", "technician_suspended", "technician_cert_kind", "certificate_not_valid",
    "ata_not_authorised", "action_not_authorised", "rts_not_authorised", "rts_certificate",
    "inspection_not_authorised", "inspection_certificate", "rii_inspector_missing", "rii_same_person",
    "rii_not_authorised", "signature_missing", "signature_malformed", "signature_key_unknown",
    "signature_invalid", "aircraft_unknown", "aircraft_serial_mismatch", "aircraft_type_mismatch",
    "registration_expired", "airworthiness_review_expired", "tool_unknown", "tool_calibration_expired",
    "part_already_installed", "part_not_installed", "part_life_limit_exceeded", "part_life_unknown",
    "aircraft_hours_decreased", "aircraft_cycles_decreased",
    "schema_required", "schema_pattern", "schema_enum", "schema_max_length",
)
STATEFUL_RULES = frozenset({"part_already_installed", "part_not_installed", "aircraft_hours_decreased",
                            "aircraft_cycles_decreased"})
VERSION_RULES = frozenset({"schema_required", "schema_pattern", "schema_enum", "schema_max_length"})

__all__ = [
    "BASE",
    "RULES",
    "STATEFUL_RULES",
    "STATE_TABLES",
    "VERSION_RULES",
    "Compliance",
    "ContractVersion",
    "DefinitionError",
    "MemoryState",
    "Registry",
    "RegistryError",
    "RegistrySource",
    "Verdict",
    "compile_version",
    "dry_run",
    "load_registry",
]

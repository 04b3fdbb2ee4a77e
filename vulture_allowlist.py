"""Names vulture (`make lint`) takes for unused that are used: read by code vulture cannot see, or
required by an interface. Parsed by vulture, never run or imported; `_` stands for any object."""

# TypedDict fields, read as JSON by `xds status`, /debug/syncz clients and tests.
_.last_nack  # noqa: B018, F821
_.rejected_resources  # noqa: B018, F821
_.connected_at  # noqa: B018, F821
# reprlib.Repr settings, read by reprlib.
_.maxlevel  # noqa: B018, F821
_.maxstring  # noqa: B018, F821
_.maxother  # noqa: B018, F821
# Arguments and methods interfaces require: signal handlers, __aexit__, SpanExporter.export.
_.signum  # noqa: B018, F821
_.frame  # noqa: B018, F821
_.exc_type  # noqa: B018, F821
_.tb  # noqa: B018, F821
_.exc_info  # noqa: B018, F821
_.export  # noqa: B018, F821

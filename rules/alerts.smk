# Alert packets: a committed data ID's APDB rows + its difference, science and template images
#   -> alerts/{visit}/alerts_{visit}_{detector}.avro (Rubin alert schema, cutouts included),
# and, when alerts.kafka.bootstrap_servers is set, the same alerts produced to Kafka.
#
# The marker is the input that commits the data ID: it changes whenever the data ID, or an
# earlier association it depends on, is associated again, so the alerts are rebuilt then.
# Producing is its own rule: a failed delivery fails only that job, and the Avro file, already
# written, stays the record of the data ID's alerts (docs/architecture.md, alerts).

ALERTS = config.get("alerts") or {}
KAFKA = ALERTS.get("kafka") or {}


def kafka_enabled():
    return bool(KAFKA.get("bootstrap_servers"))


rule package_alerts:
    input:
        marker=str(marker_path(OUT, "{visit}", "{detector}")),
        sources=apdb_fragment("DiaSource"),
        objects=apdb_fragment("DiaObject"),
        forced=apdb_fragment("DiaForcedSource"),
        diffexp=product("diffexp"),
        calexp=product("calexp"),
        template=product("template"),
    output:
        alerts=product("alerts", "avro"),
    log:
        f"{OUT}/logs/package_alerts/{{visit}}/package_alerts_{{visit}}_{{detector}}.log",
    benchmark:
        f"{OUT}/benchmarks/package_alerts/{{visit}}/package_alerts_{{visit}}_{{detector}}.tsv"
    params:
        root=OUT,
        options={key: value for key, value in ALERTS.items() if key != "kafka"},
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/package_alerts.py"


rule produce_alerts:
    input:
        alerts=product("alerts", "avro"),
    output:
        report=product("alerts", "kafka.json"),
    log:
        f"{OUT}/logs/produce_alerts/{{visit}}/produce_alerts_{{visit}}_{{detector}}.log",
    benchmark:
        f"{OUT}/benchmarks/produce_alerts/{{visit}}/produce_alerts_{{visit}}_{{detector}}.tsv"
    params:
        kafka=KAFKA,
    threads: 1
    resources:
        mem_mb=1000,
        runtime=10,
    conda:
        "../envs/apsnake.yaml"
    script:
        "../scripts/produce_alerts.py"

{{/* Checks across values that values.schema.json cannot express. Renders nothing. */}}
{{- define "payledger.validate" -}}
{{- $v := .Values }}
{{- if gt (int $v.projector.replicas) (int $v.semantics.partitions) }}
{{- fail (printf "projector.replicas (%v) is more than semantics.partitions (%v): a projector would own no partition" $v.projector.replicas $v.semantics.partitions) }}
{{- end }}
{{- if gt (int $v.coordinator.maxShardsPerWorker) (int $v.projector.maxConcurrentShards) }}
{{- fail (printf "coordinator.maxShardsPerWorker (%v) is more than projector.maxConcurrentShards (%v): workers would refuse shards" $v.coordinator.maxShardsPerWorker $v.projector.maxConcurrentShards) }}
{{- end }}
{{- if and $v.nats.deploy (gt (int $v.nats.streamReplicas) (int $v.nats.server.replicas)) }}
{{- fail (printf "nats.streamReplicas (%v) is more than nats.server.replicas (%v)" $v.nats.streamReplicas $v.nats.server.replicas) }}
{{- end }}
{{- $ports := list $v.ingest.port $v.query.port $v.projector.port $v.coordinator.port }}
{{- if or (has $v.metrics.port $ports) (and $v.tls.enabled (or (has $v.tls.healthPort $ports) (eq $v.tls.healthPort $v.metrics.port))) }}
{{- fail "metrics.port and tls.healthPort must differ from the gRPC ports and from each other" }}
{{- end }}
{{- end }}

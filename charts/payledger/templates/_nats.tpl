{{/* nats-server configuration of the in-chart cluster. */}}
{{- define "payledger.natsConf" -}}
{{- $name := printf "%s-nats" (include "payledger.fullname" .) }}
{{- $s := .Values.nats.server -}}
server_name: $SERVER_NAME
listen: 0.0.0.0:4222
http_port: 8222
pid_file: /var/run/nats/nats.pid
lame_duck_duration: 30s
lame_duck_grace_period: 10s
max_payload: 1MB
jetstream {
  store_dir: /data
  # Acknowledged means on disk: fsync every write before the ack.
  sync_interval: {{ $s.syncInterval }}
  max_file_store: {{ $s.maxFileStore }}
  max_memory_store: {{ $s.maxMemoryStore }}
}
{{- if gt (int $s.replicas) 1 }}
cluster {
  name: {{ $name }}
  listen: 0.0.0.0:6222
  routes: [
    {{- range $i := until (int $s.replicas) }}
    nats://{{ $name }}-{{ $i }}.{{ $name }}-headless:6222
    {{- end }}
  ]
}
{{- end }}
{{- end }}

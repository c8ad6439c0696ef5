{{/* Names */}}

{{- define "payledger.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name; every object name starts with it. Kept to 40 characters
so that "<fullname>-replay-coordinator" and the NATS pods' names stay under 63. */}}
{{- define "payledger.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "payledger.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels. Called with (dict "ctx" $ "component" "ingest"). */}}
{{- define "payledger.selectorLabels" -}}
app.kubernetes.io/name: {{ include "payledger.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "payledger.labels" -}}
helm.sh/chart: {{ include "payledger.chart" .ctx }}
{{ include "payledger.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: payledger
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Object names */}}
{{- define "payledger.componentName" -}}
{{- printf "%s-%s" (include "payledger.fullname" .ctx) .component }}
{{- end }}

{{- define "payledger.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "payledger.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The coordinator has a ServiceAccount of its own: the only one bound to a Role. */}}
{{- define "payledger.coordinatorServiceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- printf "%s-replay-coordinator" (include "payledger.fullname" .) }}
{{- else }}
{{- include "payledger.serviceAccountName" . }}
{{- end }}
{{- end }}

{{- define "payledger.leaseName" -}}
{{- default (printf "%s-replay-coordinator" (include "payledger.fullname" .)) .Values.coordinator.leaseName }}
{{- end }}

{{- define "payledger.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Where things are */}}

{{- define "payledger.natsUrl" -}}
{{- if .Values.nats.deploy }}
{{- printf "nats://%s-nats:4222" (include "payledger.fullname" .) }}
{{- else }}
{{- required "nats.url is required when nats.deploy is false" .Values.nats.url }}
{{- end }}
{{- end }}

{{- define "payledger.archiveUrl" -}}
{{- required "objectStore.url is required" .Values.objectStore.url }}
{{- end }}

{{- define "payledger.checkpointsUrl" -}}
{{- default (include "payledger.archiveUrl" .) .Values.objectStore.checkpointsUrl }}
{{- end }}

{{- define "payledger.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* URL of a component's Service. Called with (dict "ctx" $ "component" "query" "port" 50052). */}}
{{- define "payledger.serviceUrl" -}}
{{- printf "%s://%s-%s:%v" (include "payledger.scheme" .ctx) (include "payledger.fullname" .ctx) .component .port }}
{{- end }}

{{/* The port the kubelet's gRPC probes use: the service's own, or the plaintext
health-only port when TLS is on. */}}
{{- define "payledger.probePort" -}}
{{- if .ctx.Values.tls.enabled }}{{ .ctx.Values.tls.healthPort }}{{ else }}{{ .port }}{{ end }}
{{- end }}

{{/* Token files each workload gets: the roles it checks, plus the one it sends. */}}
{{- define "payledger.tokenRoles" -}}
{{- $roles := dict
    "ingest" (list "producer")
    "archiver" (list "producer")
    "query" (list "reader" "operator")
    "projector" (list "internal")
    "replay-coordinator" (list "operator" "internal") -}}
{{- join "," (get $roles .component) }}
{{- end }}

{{/* Pod-level pieces shared by every PayLedger server pod. */}}

{{- define "payledger.secretVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: 1Gi
{{- if .ctx.Values.nats.credentialsSecret }}
- name: nats-credentials
  secret:
    secretName: {{ .ctx.Values.nats.credentialsSecret }}
    defaultMode: 0440
    items:
      - key: {{ .ctx.Values.nats.credentialsKey }}
        path: nats.creds
{{- end }}
{{- if .ctx.Values.auth.enabled }}
- name: api-tokens
  secret:
    secretName: {{ .ctx.Values.auth.tokensSecret }}
    defaultMode: 0440
    items:
      {{- range (splitList "," (include "payledger.tokenRoles" .)) }}
      - key: {{ . }}
        path: {{ . }}
      {{- end }}
{{- end }}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  secret:
    secretName: {{ .ctx.Values.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- end }}

{{- define "payledger.secretMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if .ctx.Values.nats.credentialsSecret }}
- name: nats-credentials
  mountPath: /etc/payledger/nats
  readOnly: true
{{- end }}
{{- if .ctx.Values.auth.enabled }}
- name: api-tokens
  mountPath: /etc/payledger/tokens
  readOnly: true
{{- end }}
{{- if .ctx.Values.tls.enabled }}
- name: tls
  mountPath: /etc/payledger/tls
  readOnly: true
{{- end }}
{{- end }}

{{/* Object-store keys, from the Secret only. */}}
{{- define "payledger.objectStoreEnv" -}}
{{- with .Values.objectStore.credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.objectStore.accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.objectStore.secretAccessKeyKey }}
{{- end }}
{{- end }}

{{/* TLS as a client: trust ca.crt, and present the release's certificate when the
servers require client certificates. */}}
{{- define "payledger.tlsClientEnv" -}}
{{- if .Values.tls.enabled }}
- name: PAYLEDGER_TLS_CA
  value: /etc/payledger/tls/ca.crt
{{- if .Values.tls.clientAuth }}
- name: PAYLEDGER_TLS_CLIENT_CERT
  value: /etc/payledger/tls/tls.crt
- name: PAYLEDGER_TLS_CLIENT_KEY
  value: /etc/payledger/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* The coordinator as a client of the workers' RunShard: trust ca.crt, check every
projector's certificate against the headless Service's name (the coordinator reaches
discovered pods by IP, which the certificate does not name), and present the release's
certificate when the servers require client certificates. */}}
{{- define "payledger.workerTlsEnv" -}}
{{- if .Values.tls.enabled }}
- name: PAYLEDGER_WORKER_CA
  value: /etc/payledger/tls/ca.crt
- name: PAYLEDGER_WORKER_TLS_SERVER_NAME
  value: {{ printf "%s-projector" (include "payledger.fullname" .) | quote }}
{{- if .Values.tls.clientAuth }}
- name: PAYLEDGER_WORKER_CLIENT_CERT
  value: /etc/payledger/tls/tls.crt
- name: PAYLEDGER_WORKER_CLIENT_KEY
  value: /etc/payledger/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* A component's `env` map as EnvVars, in key order. */}}
{{- define "payledger.envMap" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}

{{/* Spread a workload's pods over nodes when the scheduler can. */}}
{{- define "payledger.spread" -}}
topologySpreadConstraints:
  - maxSkew: 1
    topologyKey: kubernetes.io/hostname
    whenUnsatisfiable: ScheduleAnyway
    labelSelector:
      matchLabels:
        {{- include "payledger.selectorLabels" . | nindent 8 }}
{{- end }}

{{/*
The pod template of a PayLedger server. Called with a dict:
  ctx        the root context
  component  ingest | archiver | query | projector | replay-coordinator
  values     the component's values
  binary     the binary to run
  port       the gRPC port
  health     the gRPC service name the readiness probe asks for
  startupHealth  the one the startup probe asks for, if not `health` ("": the
             server as a whole)
  env        extra EnvVars (a YAML list as a string)
  objectStore  whether it gets the object-store keys
  serviceAccountName, automountToken
*/}}
{{- define "payledger.serverPod" -}}
{{- $ctx := .ctx }}
{{- $v := .values }}
{{- $startupHealth := .health }}
{{- if hasKey . "startupHealth" }}
{{- $startupHealth = .startupHealth }}
{{- end -}}
metadata:
  labels:
    {{- include "payledger.labels" . | nindent 4 }}
  annotations:
    checksum/config: {{ include (print $ctx.Template.BasePath "/configmap.yaml") $ctx | sha256sum }}
    {{- with $v.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ .serviceAccountName }}
  automountServiceAccountToken: {{ .automountToken }}
  enableServiceLinks: false
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  {{- with $v.terminationGracePeriodSeconds }}
  terminationGracePeriodSeconds: {{ . }}
  {{- end }}
  {{- include "payledger.spread" . | nindent 2 }}
  {{- with $v.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with $v.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ .component }}
      image: {{ include "payledger.image" $ctx }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      command: [{{ .binary | quote }}]
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
      ports:
        - name: grpc
          containerPort: {{ .port }}
          protocol: TCP
        - name: metrics
          containerPort: {{ $ctx.Values.metrics.port }}
          protocol: TCP
        {{- if $ctx.Values.tls.enabled }}
        - name: health
          containerPort: {{ $ctx.Values.tls.healthPort }}
          protocol: TCP
        {{- end }}
      envFrom:
        - configMapRef:
            name: {{ include "payledger.fullname" $ctx }}
      env:
        - name: PAYLEDGER_LISTEN
          value: "0.0.0.0:{{ .port }}"
        {{- with .env }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- if .objectStore }}
        {{- with include "payledger.objectStoreEnv" $ctx | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        {{- end }}
        {{- with include "payledger.envMap" $v.env | trim }}
        {{- . | nindent 8 }}
        {{- end }}
      # grpc.health.v1 through the kubelet: liveness asks for the server as a whole
      # (""), readiness for the service this pod exists to serve.
      startupProbe:
        grpc:
          port: {{ include "payledger.probePort" . }}
          service: {{ $startupHealth | quote }}
        periodSeconds: 5
        failureThreshold: 60
      readinessProbe:
        grpc:
          port: {{ include "payledger.probePort" . }}
          service: {{ .health | quote }}
        periodSeconds: 10
        timeoutSeconds: 5
        failureThreshold: 3
      livenessProbe:
        grpc:
          port: {{ include "payledger.probePort" . }}
          service: ""
        periodSeconds: 20
        timeoutSeconds: 5
        failureThreshold: 3
      resources:
        {{- toYaml $v.resources | nindent 8 }}
      volumeMounts:
        {{- include "payledger.secretMounts" . | nindent 8 }}
  volumes:
    {{- include "payledger.secretVolumes" . | nindent 4 }}
{{- end }}

{{/*
The pod template of a replay Job (nightly or backfill): the CLI against the coordinator.
Called with (dict "ctx" $ "args" (list ...) "values" <job values>).
*/}}
{{- define "payledger.replayJobPod" -}}
{{- $ctx := .ctx -}}
metadata:
  labels:
    {{- include "payledger.labels" (dict "ctx" $ctx "component" "replay-job") | nindent 4 }}
spec:
  restartPolicy: Never
  serviceAccountName: {{ include "payledger.serviceAccountName" $ctx }}
  automountServiceAccountToken: false
  enableServiceLinks: false
  {{- with $ctx.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $ctx.Values.podSecurityContext | nindent 4 }}
  containers:
    - name: replay
      image: {{ include "payledger.image" $ctx }}
      imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
      command: ["payledger"]
      args:
        {{- range .args }}
        - {{ . | quote }}
        {{- end }}
      securityContext:
        {{- toYaml $ctx.Values.securityContext | nindent 8 }}
      env:
        - name: PAYLEDGER_COORDINATOR_URL
          value: {{ include "payledger.serviceUrl" (dict "ctx" $ctx "component" "replay-coordinator" "port" $ctx.Values.coordinator.port) | quote }}
        {{- if $ctx.Values.auth.enabled }}
        - name: PAYLEDGER_TOKEN
          valueFrom:
            secretKeyRef:
              name: {{ $ctx.Values.auth.tokensSecret }}
              key: operator
        {{- end }}
        {{- with include "payledger.tlsClientEnv" $ctx | trim }}
        {{- . | nindent 8 }}
        {{- end }}
        - name: RUST_LOG
          value: {{ $ctx.Values.logging.level | quote }}
      resources:
        {{- toYaml .values.resources | nindent 8 }}
      volumeMounts:
        - name: tmp
          mountPath: /tmp
        {{- if $ctx.Values.tls.enabled }}
        - name: tls
          mountPath: /etc/payledger/tls
          readOnly: true
        {{- end }}
  volumes:
    - name: tmp
      emptyDir:
        sizeLimit: 64Mi
    {{- if $ctx.Values.tls.enabled }}
    - name: tls
      secret:
        secretName: {{ $ctx.Values.tls.secretName }}
        defaultMode: 0440
    {{- end }}
{{- end }}

{{/*
Job spec pieces shared by the nightly and backfill Jobs: exit status 3 (committed,
but reconciliation found divergent or missing rows) fails the Job at once, since a
retry cannot change it; evictions do not count against backoffLimit.
*/}}
{{- define "payledger.replayFailurePolicy" -}}
podFailurePolicy:
  rules:
    - action: FailJob
      onExitCodes:
        containerName: replay
        operator: In
        values: [3]
    - action: Ignore
      onPodConditions:
        - type: DisruptionTarget
          status: "True"
{{- end }}

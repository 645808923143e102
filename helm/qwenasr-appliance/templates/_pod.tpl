{{/*
The pod template of the Deployment or StatefulSet (templates/deployment.yaml, statefulset.yaml).
*/}}
{{- define "qwenasr.podTemplate" -}}
{{- $apiKeysSecret := include "qwenasr.apiKeysSecretName" . -}}
{{- $modelsPath := .Values.modelCache.mountPath -}}
{{- $resources := deepCopy .Values.resources -}}
{{- if .Values.gpu.enabled }}
{{- $limits := default (dict) $resources.limits }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $resources "limits" $limits }}
{{- end -}}
metadata:
  annotations:
    {{- if and .Values.apiKeys.keys (not .Values.apiKeys.existingSecret) }}
    checksum/api-keys: {{ .Values.apiKeys.keys | join "," | sha256sum }}
    {{- end }}
    kubectl.kubernetes.io/default-container: appliance
    {{- with .Values.podAnnotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  labels:
    {{- include "qwenasr.labels" . | nindent 4 }}
    {{- with .Values.podLabels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
spec:
  serviceAccountName: {{ include "qwenasr.serviceAccountName" . }}
  automountServiceAccountToken: {{ .Values.serviceAccount.automountServiceAccountToken }}
  # No VLLM_*/QWENASR_* variables injected from Services of the namespace.
  enableServiceLinks: false
  {{- with .Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if and .Values.gpu.enabled .Values.runtimeClassName }}
  runtimeClassName: {{ .Values.runtimeClassName }}
  {{- end }}
  {{- with .Values.priorityClassName }}
  priorityClassName: {{ . }}
  {{- end }}
  securityContext:
    {{- toYaml .Values.podSecurityContext | nindent 4 }}
  terminationGracePeriodSeconds: {{ include "qwenasr.terminationGracePeriodSeconds" . }}
  {{- if or .Values.modelCache.prefetch.enabled .Values.initContainers }}
  initContainers:
    {{- if .Values.modelCache.prefetch.enabled }}
    # Downloads config.modelId into the Hugging Face cache on the model volume (resumable).
    - name: prefetch-model
      image: {{ include "qwenasr.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      command:
        - python3
        - -c
        - |
          import os
          from huggingface_hub import snapshot_download
          path = snapshot_download(os.environ["MODEL_ID"])
          print(f"model {os.environ['MODEL_ID']} ready in {path}", flush=True)
          aligner = os.environ.get("ALIGNER_MODEL_ID", "")
          if aligner and not aligner.startswith("/"):
              path = snapshot_download(aligner)
              print(f"aligner {aligner} ready in {path}", flush=True)
      env:
        - name: MODEL_ID
          value: {{ .Values.config.modelId | quote }}
        - name: ALIGNER_MODEL_ID
          value: {{ .Values.config.alignerModelId | quote }}
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $modelsPath | quote }}
        {{- with include "qwenasr.hfEnv" . }}{{ . | nindent 8 }}{{ end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      resources:
        {{- toYaml .Values.modelCache.prefetch.resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $modelsPath }}
        {{- with include "qwenasr.cacheMount" . }}{{ . | nindent 8 }}{{ end }}
        - name: tmp
          mountPath: /tmp
    {{- end }}
    {{- with .Values.initContainers }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
  containers:
    - name: appliance
      image: {{ include "qwenasr.image" . }}
      imagePullPolicy: {{ .Values.image.pullPolicy }}
      ports:
        - name: http
          containerPort: 8001
          protocol: TCP
      env:
        - name: HOST
          value: "0.0.0.0"
        - name: PORT
          value: "8001"
        - name: HF_HOME
          value: {{ printf "%s/huggingface" $modelsPath | quote }}
        {{- include "qwenasr.configEnv" . | trim | nindent 8 }}
        {{- with include "qwenasr.hfEnv" . }}{{ . | nindent 8 }}{{ end }}
        {{- if $apiKeysSecret }}
        - name: API_KEYS
          valueFrom:
            secretKeyRef:
              name: {{ $apiKeysSecret }}
              key: {{ include "qwenasr.apiKeysSecretKey" . }}
        {{- end }}
        {{- with .Values.extraEnv }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with .Values.extraEnvFrom }}
      envFrom:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if .Values.probes.startup.enabled }}
      # Holds liveness and readiness back until the engine first serves (model load: minutes).
      startupProbe:
        httpGet:
          path: /ready
          port: http
          {{- with .Values.probes.httpHeaders }}
          httpHeaders:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        initialDelaySeconds: {{ .Values.probes.startup.initialDelaySeconds }}
        periodSeconds: {{ .Values.probes.startup.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.startup.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.startup.failureThreshold }}
      {{- end }}
      {{- if .Values.probes.readiness.enabled }}
      readinessProbe:
        httpGet:
          path: /ready
          port: http
          {{- with .Values.probes.httpHeaders }}
          httpHeaders:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        periodSeconds: {{ .Values.probes.readiness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.readiness.timeoutSeconds }}
        successThreshold: {{ .Values.probes.readiness.successThreshold }}
        failureThreshold: {{ .Values.probes.readiness.failureThreshold }}
      {{- end }}
      {{- if .Values.probes.liveness.enabled }}
      # /health only says the process (event loop) lives: it never waits on the GPU or the queue.
      livenessProbe:
        httpGet:
          path: /health
          port: http
          {{- with .Values.probes.httpHeaders }}
          httpHeaders:
            {{- toYaml . | nindent 12 }}
          {{- end }}
        periodSeconds: {{ .Values.probes.liveness.periodSeconds }}
        timeoutSeconds: {{ .Values.probes.liveness.timeoutSeconds }}
        failureThreshold: {{ .Values.probes.liveness.failureThreshold }}
      {{- end }}
      {{- if gt (int .Values.preStopSleepSeconds) 0 }}
      lifecycle:
        preStop:
          exec:
            command: ["sleep", "{{ int .Values.preStopSleepSeconds }}"]
      {{- end }}
      resources:
        {{- toYaml $resources | nindent 8 }}
      securityContext:
        {{- toYaml .Values.securityContext | nindent 8 }}
      volumeMounts:
        - name: models
          mountPath: {{ $modelsPath }}
          readOnly: {{ .Values.modelCache.readOnly }}
        {{- with include "qwenasr.cacheMount" . }}{{ . | nindent 8 }}{{ end }}
        - name: tmp
          mountPath: /tmp
        - name: dshm
          mountPath: /dev/shm
        {{- with .Values.extraVolumeMounts }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    {{- with .Values.sidecars }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  volumes:
    {{- if not (and .Values.modelCache.enabled (eq .Values.workloadKind "StatefulSet") (not .Values.modelCache.existingClaim)) }}
    {{- /* A StatefulSet gets `models` from its volumeClaimTemplates. */}}
    - name: models
      {{- if .Values.modelCache.enabled }}
      persistentVolumeClaim:
        claimName: {{ include "qwenasr.modelClaimName" . }}
        readOnly: {{ .Values.modelCache.readOnly }}
      {{- else }}
      emptyDir:
        sizeLimit: {{ .Values.modelCache.emptyDirSizeLimit }}
      {{- end }}
    {{- end }}
    {{- if not (include "qwenasr.cacheOnModelVolume" .) }}
    - name: cache
      emptyDir:
        sizeLimit: {{ .Values.cache.sizeLimit }}
    {{- end }}
    - name: tmp
      emptyDir:
        sizeLimit: {{ .Values.tmpSizeLimit }}
    - name: dshm
      emptyDir:
        medium: Memory
        sizeLimit: {{ .Values.shmSizeLimit }}
    {{- with .Values.extraVolumes }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- with .Values.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- $tolerations := .Values.tolerations }}
  {{- if and .Values.gpu.enabled .Values.gpu.tolerateGpuTaint }}
  {{- $gpuToleration := dict "key" "nvidia.com/gpu" "operator" "Exists" "effect" "NoSchedule" }}
  {{- if not (has $gpuToleration $tolerations) }}
  {{- $tolerations = append $tolerations $gpuToleration }}
  {{- end }}
  {{- end }}
  {{- with $tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .Values.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- if .Values.topologySpreadConstraints }}
  topologySpreadConstraints:
    {{- range .Values.topologySpreadConstraints }}
    {{- $constraint := deepCopy . }}
    {{- if not $constraint.labelSelector }}
    {{- $_ := set $constraint "labelSelector" (dict "matchLabels" (include "qwenasr.selectorLabels" $ | fromYaml)) }}
    {{- end }}
    - {{- toYaml $constraint | nindent 6 }}
    {{- end }}
  {{- end }}
{{- end }}

{{/*
/cache: a subPath of the model volume (kept across restarts) or its own emptyDir.
*/}}
{{- define "qwenasr.cacheMount" -}}
{{- if include "qwenasr.cacheOnModelVolume" . }}
- name: models
  mountPath: /cache
  subPath: {{ .Values.cache.subPath }}
{{- else }}
- name: cache
  mountPath: /cache
{{- end }}
{{- end }}

{{/*
Hugging Face Hub settings: HF_TOKEN from an existing Secret, HF_HUB_OFFLINE.
*/}}
{{- define "qwenasr.hfEnv" -}}
{{- with .Values.huggingface.token.existingSecret }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: {{ $.Values.huggingface.token.key }}
{{- end }}
{{- if .Values.huggingface.offline }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- end }}
{{- end }}

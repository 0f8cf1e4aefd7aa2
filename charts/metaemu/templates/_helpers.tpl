{{- /* The image of both node-mode containers (node-setup and metaemu). */}}
{{- define "metaemu.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}

{{- /* The agent's uid: ONE value for the metaemu container's runAsUser and the metaemu-agent-uid
policy's agentUid (issue #11), so they cannot disagree. */}}
{{- define "metaemu.agentUid" -}}
{{ int .Values.node.agentUid }}
{{- end }}

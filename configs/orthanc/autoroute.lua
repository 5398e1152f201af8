-- Auto-routing of dermoscopy images from Orthanc to the dermfusion listener.
--
-- When a study becomes stable (no new instance for "StableAge" seconds), C-STORE to the
-- modality "dermfusion" (see orthanc.json) each of its instances that is a dermoscopy image
-- and has not been forwarded before. Forwarded instances get the user metadata
-- "DermfusionForwarded" (registered under "UserMetadata" in orthanc.json): the SR that
-- dermfusion stores back makes the study unstable and then stable again, and that second
-- pass must not re-send the images. Only a successful C-STORE marks instances, so after a
-- failure (dermfusion down) they are retried the next time the study becomes stable, i.e.
-- after it receives another instance (Orthanc does not retry by itself, and a study that was
-- unstable when Orthanc stopped does not become stable after a restart).
--
-- What counts as a dermoscopy image (dermfusion scores these SOP classes, see
-- dicom_io/images.py): Dermoscopic Photography whatever the modality, and VL Photographic or
-- Secondary Capture in a series whose Modality is DMS or XC. SRs, presentation states,
-- documents and images of other modalities are never sent.
--
-- Runs in Orthanc 1.10's Lua 5.3 (RestApiGet/RestApiPost/RestApiPut return nil on failure).
-- Logs one line per forward with the study's Orthanc id: never patient data.

local MODALITY = 'dermfusion'
local MARK = 'DermfusionForwarded'

local DERMOSCOPIC_PHOTOGRAPHY = '1.2.840.10008.5.1.4.1.1.77.1.7'
local PHOTO_CLASSES = {
  ['1.2.840.10008.5.1.4.1.1.77.1.4'] = true,  -- VL Photographic Image
  ['1.2.840.10008.5.1.4.1.1.7'] = true,       -- Secondary Capture Image
}
local PHOTO_MODALITIES = { DMS = true, XC = true }


local function IsDermoscopy(sopClassUid, modality)
  if sopClassUid == DERMOSCOPIC_PHOTOGRAPHY then
    return true
  end
  return PHOTO_CLASSES[sopClassUid] == true and PHOTO_MODALITIES[modality] == true
end


-- Orthanc ids of the study's dermoscopy instances that were not forwarded yet.
local function PendingInstances(studyId)
  local body = RestApiGet('/studies/' .. studyId .. '/series', true)
  if body == nil then
    return nil
  end
  local pending = {}
  for _, series in ipairs(ParseJson(body)) do
    local modality = series['MainDicomTags']['Modality'] or ''
    for _, instanceId in ipairs(series['Instances']) do
      local metadata = RestApiGet('/instances/' .. instanceId .. '/metadata?expand', true)
      if metadata ~= nil then
        local values = ParseJson(metadata)
        if values[MARK] == nil and IsDermoscopy(values['SopClassUid'], modality) then
          table.insert(pending, instanceId)
        end
      end
    end
  end
  return pending
end


function OnStableStudy(studyId, tags, metadata)
  local pending = PendingInstances(studyId)
  if pending == nil then
    print('dermfusion autoroute: study ' .. studyId .. ' vanished before routing')
    return
  end
  if #pending == 0 then
    return
  end

  -- Synchronous: the instances are marked only once dermfusion has accepted them all.
  local request = { Resources = pending, Synchronous = true }
  local answer = RestApiPost('/modalities/' .. MODALITY .. '/store', DumpJson(request), true)
  if answer == nil then
    print('dermfusion autoroute: FAILED to forward ' .. #pending .. ' instance(s) of study '
          .. studyId .. ' to ' .. MODALITY .. '; retried when the study next becomes stable')
    return
  end

  local now = os.date('!%Y-%m-%dT%H:%M:%SZ')
  for _, instanceId in ipairs(pending) do
    RestApiPut('/instances/' .. instanceId .. '/metadata/' .. MARK, now, true)
  end
  print('dermfusion autoroute: forwarded ' .. #pending .. ' instance(s) of study ' .. studyId
        .. ' to ' .. MODALITY)
end

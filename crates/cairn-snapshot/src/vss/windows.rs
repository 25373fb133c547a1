//! The calls into Windows: [`VssBackend`] over `IVssBackupComponents`.
//!
//! The newest `windows` crate (0.62) has `IVssAsync` and the VSS constants but not
//! `IVssBackupComponents` (Microsoft's metadata skipped `vsbackup.h`), so this module uses
//! `winapi` 0.3.9's declarations of the same COM interfaces. It is the one part of Cairn
//! that cannot run on the Linux machines the project is built and tested on: it is compiled
//! with `cargo check --target x86_64-pc-windows-gnu -p cairn-snapshot` and never executed
//! there. It therefore holds no logic: every decision is in the requester, tested against
//! the simulation. Each method makes one COM call (plus waiting on its `IVssAsync`).
#![allow(unsafe_code)]

use std::ptr::null_mut;
use std::time::Duration;

use winapi::Interface;
use winapi::shared::guiddef::GUID;
use winapi::shared::rpcdce::{RPC_C_AUTHN_LEVEL_PKT_PRIVACY, RPC_C_IMP_LEVEL_IDENTIFY};
use winapi::shared::winerror::{HRESULT, RPC_E_TOO_LATE};
use winapi::shared::wtypes::BSTR;
use winapi::um::combaseapi::{CoInitializeEx, CoInitializeSecurity};
use winapi::um::objbase::COINIT_MULTITHREADED;
use winapi::um::objidlbase::EOAC_DYNAMIC_CLOAKING;
use winapi::um::oleauto::{SysFreeString, SysStringLen};
use winapi::um::vsbackup::{
    CreateVssBackupComponents, IVssBackupComponents, IVssExamineWriterMetadata,
    VssFreeSnapshotProperties,
};
use winapi::um::vss::{
    IVssAsync, VSS_BT_COPY, VSS_BT_FULL, VSS_CTX_BACKUP, VSS_CTX_FILE_SHARE_BACKUP, VSS_ID,
    VSS_SNAPSHOT_PROP, VSS_WRITER_STATE,
};
use winapi::um::vsserror::{VSS_S_ASYNC_CANCELLED, VSS_S_ASYNC_FINISHED, VSS_S_ASYNC_PENDING};
use winapi::um::vswriter::{VSS_SOURCE_TYPE, VSS_USAGE_TYPE};

use super::{BackupType, HResult, VssBackend, WriterInfo, WriterState, WriterStatus};

fn check(hr: HRESULT) -> Result<(), HResult> {
    if hr < 0 { Err(HResult(hr as u32)) } else { Ok(()) }
}

fn wide(s: &str) -> Vec<u16> {
    s.encode_utf16().chain(std::iter::once(0)).collect()
}

/// A `BSTR` as a `String`, freeing it.
unsafe fn take_bstr(b: BSTR) -> String {
    if b.is_null() {
        return String::new();
    }
    // SAFETY: `b` is a BSTR the call returned; its length is `SysStringLen`.
    let s = unsafe {
        String::from_utf16_lossy(std::slice::from_raw_parts(b, SysStringLen(b) as usize))
    };
    unsafe { SysFreeString(b) };
    s
}

/// A NUL-terminated wide string as a `String`.
unsafe fn from_wide(p: *const u16) -> String {
    if p.is_null() {
        return String::new();
    }
    let mut len = 0;
    // SAFETY: VSS returns NUL-terminated strings.
    while unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(p, len) })
}

fn guid_string(g: &GUID) -> String {
    format!(
        "{{{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}}}",
        g.Data1,
        g.Data2,
        g.Data3,
        g.Data4[0],
        g.Data4[1],
        g.Data4[2],
        g.Data4[3],
        g.Data4[4],
        g.Data4[5],
        g.Data4[6],
        g.Data4[7]
    )
}

/// Waits for an asynchronous VSS call started by `start` (which fills in the `IVssAsync`).
fn wait(
    timeout: Duration,
    start: impl FnOnce(*mut *mut IVssAsync) -> HRESULT,
) -> Result<(), HResult> {
    let mut job: *mut IVssAsync = null_mut();
    check(start(&mut job))?;
    if job.is_null() {
        return Err(HResult::UNEXPECTED);
    }
    // SAFETY: `job` is a live IVssAsync returned by the call; released once below.
    unsafe {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let waited = (*job).Wait(ms);
        let mut status: HRESULT = 0;
        let queried = (*job).QueryStatus(&mut status, null_mut());
        if status == VSS_S_ASYNC_PENDING {
            (*job).Cancel();
        }
        (*job).Release();
        check(waited)?;
        check(queried)?;
        match status {
            VSS_S_ASYNC_FINISHED => Ok(()),
            VSS_S_ASYNC_PENDING => Err(HResult::TIMED_OUT),
            VSS_S_ASYNC_CANCELLED => Err(HResult::TIMED_OUT),
            other => check(other).and(Err(HResult(other as u32))),
        }
    }
}

fn writer_state(s: VSS_WRITER_STATE) -> WriterState {
    match s {
        1 => WriterState::Stable,
        5 => WriterState::WaitingForBackupComplete,
        6 => WriterState::FailedAtIdentify,
        7 => WriterState::FailedAtPrepareBackup,
        8 => WriterState::FailedAtPrepareSnapshot,
        9 => WriterState::FailedAtFreeze,
        10 => WriterState::FailedAtThaw,
        11 => WriterState::FailedAtPostSnapshot,
        12 => WriterState::FailedAtBackupComplete,
        0 => WriterState::Unknown,
        other => WriterState::Other(other),
    }
}

/// Puts the calling thread in COM's multithreaded apartment, once per thread: the session
/// may be used from another thread than the one that created it.
fn join_mta() -> Result<(), HResult> {
    thread_local!(static JOINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if JOINED.get() {
        return Ok(());
    }
    // SAFETY: plain COM initialisation of this thread (S_FALSE: it already was).
    check(unsafe { CoInitializeEx(null_mut(), COINIT_MULTITHREADED) })?;
    JOINED.set(true);
    Ok(())
}

/// The real VSS, through one `IVssBackupComponents` per attempt.
pub struct WindowsVss {
    components: *mut IVssBackupComponents,
    context_set: bool,
    snapshots: Vec<(String, VSS_ID)>,
}

impl WindowsVss {
    /// Initialises COM (multithreaded, with the security VSS needs) and creates the
    /// backup components.
    pub fn new() -> Result<WindowsVss, HResult> {
        // SAFETY: plain COM initialisation; RPC_E_TOO_LATE means the process already set
        // its security, which is fine.
        unsafe {
            check(CoInitializeEx(null_mut(), COINIT_MULTITHREADED))?;
            let hr = CoInitializeSecurity(
                null_mut(),
                -1,
                null_mut(),
                null_mut(),
                RPC_C_AUTHN_LEVEL_PKT_PRIVACY,
                RPC_C_IMP_LEVEL_IDENTIFY,
                null_mut(),
                EOAC_DYNAMIC_CLOAKING,
                null_mut(),
            );
            if hr != RPC_E_TOO_LATE {
                check(hr)?;
            }
        }
        let mut vss =
            WindowsVss { components: null_mut(), context_set: false, snapshots: Vec::new() };
        vss.create()?;
        Ok(vss)
    }

    fn create(&mut self) -> Result<(), HResult> {
        let mut components = null_mut();
        // SAFETY: creates and initialises a new IVssBackupComponents we own.
        unsafe {
            check(CreateVssBackupComponents(&mut components))?;
            check((*components).InitializeForBackup(null_mut()))?;
        }
        self.components = components;
        self.context_set = false;
        self.snapshots.clear();
        Ok(())
    }

    fn vss(&self) -> Result<&IVssBackupComponents, HResult> {
        join_mta()?;
        // SAFETY: a non-null pointer here is the live object `create` made.
        unsafe { self.components.as_ref() }.ok_or(HResult::UNEXPECTED)
    }

    fn release(&mut self) {
        if !self.components.is_null() {
            // SAFETY: releases our one reference.
            unsafe { (*self.components).Release() };
            self.components = null_mut();
        }
    }

    fn set_context(&mut self, with_writers: bool) -> Result<(), HResult> {
        if self.components.is_null() {
            self.create()?;
        }
        if !self.context_set {
            let context = if with_writers { VSS_CTX_BACKUP } else { VSS_CTX_FILE_SHARE_BACKUP };
            // SAFETY: one call on the live object.
            check(unsafe { self.vss()?.SetContext(context as i32) })?;
            self.context_set = true;
        }
        Ok(())
    }
}

// SAFETY: COM is initialised multithreaded (`COINIT_MULTITHREADED`) and the backup
// components object is free-threaded in the MTA; the session hands it between threads behind
// a mutex, never to two at once.
unsafe impl Send for WindowsVss {}

impl Drop for WindowsVss {
    fn drop(&mut self) {
        self.release();
    }
}

impl VssBackend for WindowsVss {
    fn gather_writer_metadata(&mut self, timeout: Duration) -> Result<Vec<WriterInfo>, HResult> {
        self.set_context(true)?;
        let vss = self.vss()?;
        // SAFETY: each call is on the live object with out-pointers to our locals; every
        // metadata object and BSTR returned is released or freed.
        unsafe {
            wait(timeout, |job| vss.GatherWriterMetadata(job))?;
            let mut count = 0;
            check(vss.GetWriterMetadataCount(&mut count))?;
            let mut writers = Vec::new();
            for i in 0..count {
                let mut instance: VSS_ID = std::mem::zeroed();
                let mut metadata: *mut IVssExamineWriterMetadata = null_mut();
                check(vss.GetWriterMetadata(i, &mut instance, &mut metadata))?;
                let mut writer_id: VSS_ID = std::mem::zeroed();
                let mut name: BSTR = null_mut();
                let mut usage: VSS_USAGE_TYPE = 0;
                let mut source: VSS_SOURCE_TYPE = 0;
                let hr = (*metadata).GetIdentity(
                    &mut instance,
                    &mut writer_id,
                    &mut name,
                    &mut usage,
                    &mut source,
                );
                (*metadata).Release();
                check(hr)?;
                // Matched on the instance id: writers of one class share `writer_id`.
                writers.push(WriterInfo { name: take_bstr(name), id: guid_string(&instance) });
            }
            check(vss.FreeWriterMetadata())?;
            Ok(writers)
        }
    }

    fn set_backup_state(&mut self, kind: BackupType, with_writers: bool) -> Result<(), HResult> {
        self.set_context(with_writers)?;
        let kind = match kind {
            BackupType::Full => VSS_BT_FULL,
            BackupType::Copy => VSS_BT_COPY,
        };
        // SAFETY: one call on the live object. No component selection, no bootable system
        // state, no partial files; whether writers take part was set by the context.
        let _ = with_writers;
        check(unsafe { self.vss()?.SetBackupState(false, false, kind, false) })
    }

    fn start_snapshot_set(&mut self) -> Result<(), HResult> {
        // SAFETY: out-pointer to a local.
        unsafe {
            let mut set: VSS_ID = std::mem::zeroed();
            check(self.vss()?.StartSnapshotSet(&mut set))
        }
    }

    fn add_to_snapshot_set(&mut self, volume: &str) -> Result<(), HResult> {
        let mut name = wide(volume);
        // SAFETY: `name` outlives the call; GUID_NULL lets VSS pick the provider.
        let id = unsafe {
            let mut id: VSS_ID = std::mem::zeroed();
            check(self.vss()?.AddToSnapshotSet(name.as_mut_ptr(), std::mem::zeroed(), &mut id))?;
            id
        };
        self.snapshots.push((volume.to_string(), id));
        Ok(())
    }

    fn prepare_for_backup(&mut self, timeout: Duration) -> Result<(), HResult> {
        let vss = self.vss()?;
        // SAFETY: as in `wait`.
        wait(timeout, |job| unsafe { vss.PrepareForBackup(job) })
    }

    fn do_snapshot_set(&mut self, timeout: Duration) -> Result<(), HResult> {
        let vss = self.vss()?;
        // SAFETY: as in `wait`.
        wait(timeout, |job| unsafe { vss.DoSnapshotSet(job) })
    }

    fn gather_writer_status(&mut self, timeout: Duration) -> Result<Vec<WriterStatus>, HResult> {
        let vss = self.vss()?;
        // SAFETY: out-pointers to locals; every BSTR is freed.
        unsafe {
            wait(timeout, |job| vss.GatherWriterStatus(job))?;
            let mut count = 0;
            check(vss.GetWriterStatusCount(&mut count))?;
            let mut out = Vec::new();
            for i in 0..count {
                let mut instance: VSS_ID = std::mem::zeroed();
                let mut writer: VSS_ID = std::mem::zeroed();
                let mut name: BSTR = null_mut();
                let mut state: VSS_WRITER_STATE = 0;
                let mut failure: HRESULT = 0;
                check(vss.GetWriterStatus(
                    i,
                    &mut instance,
                    &mut writer,
                    &mut name,
                    &mut state,
                    &mut failure,
                ))?;
                out.push(WriterStatus {
                    name: take_bstr(name),
                    id: guid_string(&instance),
                    state: writer_state(state),
                    failure: (failure < 0).then_some(HResult(failure as u32)),
                });
            }
            check(vss.FreeWriterStatus())?;
            Ok(out)
        }
    }

    fn snapshot_device(&mut self, volume: &str) -> Result<String, HResult> {
        let id = self
            .snapshots
            .iter()
            .find(|(v, _)| v == volume)
            .map(|(_, id)| *id)
            .ok_or(HResult::UNEXPECTED)?;
        // SAFETY: `prop` is filled by the call and freed by VssFreeSnapshotProperties.
        unsafe {
            let mut prop: VSS_SNAPSHOT_PROP = std::mem::zeroed();
            check(self.vss()?.GetSnapshotProperties(id, &mut prop))?;
            let device = from_wide(prop.m_pwszSnapshotDeviceObject);
            VssFreeSnapshotProperties(&mut prop);
            Ok(device)
        }
    }

    fn backup_complete(&mut self, timeout: Duration) -> Result<(), HResult> {
        let vss = self.vss()?;
        // SAFETY: as in `wait`.
        wait(timeout, |job| unsafe { vss.BackupComplete(job) })
    }

    fn abort_backup(&mut self) {
        if let Ok(vss) = self.vss() {
            // SAFETY: one call on the live object; the object is not reused after an abort.
            unsafe { vss.AbortBackup() };
        }
        self.release();
    }
}

// The interface id is checked at compile time, so a wrong winapi feature set fails the
// Windows check rather than a run.
const _: fn() -> GUID = IVssBackupComponents::uuidof;

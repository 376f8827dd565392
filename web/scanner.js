// Reads the device serial from its label through the camera. Browsers' own BarcodeDetector
// exists only in some Chromium builds (not on desktop Linux or Windows, not in Firefox or
// Safari), so the page decodes frames itself with ZXing (zxing.min.js: @zxing/library, pinned,
// vendored byte for byte; see README.md). It is loaded only when an installer starts scanning.
//
// A label often carries more than one code (a serial in Code 128, a QR code with a web
// address, a MAC address...): every frame is read by each family of readers, and the first text
// that looks like a serial is the answer. Frames never leave the page.

const FRAME_INTERVAL_MS = 150;
const GIVE_UP_MS = 120_000;
const MAX_FRAME_WIDTH = 1280;

let decoderLoading;

/** The vendored decoder, as a classic script (CSP script-src 'self'), loaded once. */
function decoder() {
  if (!decoderLoading) {
    decoderLoading = new Promise((resolve, reject) => {
      const script = document.createElement('script');
      script.src = 'zxing.min.js';
      script.onload = () => (globalThis.ZXing ? resolve(globalThis.ZXing) : reject(new ScanError('decoder')));
      script.onerror = () => {
        decoderLoading = undefined; // a later attempt may load it
        script.remove();
        reject(new ScanError('decoder'));
      };
      document.head.append(script);
    });
  }
  return decoderLoading;
}

/** Why scanning stopped without a serial: `kind` is one of the keys of `scanWords`. */
export class ScanError extends Error {
  constructor(kind) {
    super(kind);
    this.kind = kind;
  }
}

/** Can this browser show the page a camera at all (a secure context with getUserMedia)? */
export function cameraAvailable() {
  return Boolean(globalThis.isSecureContext && navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
}

function cameraError(e) {
  switch (e && e.name) {
    case 'NotAllowedError':
    case 'SecurityError':
      return new ScanError('blocked');
    case 'NotFoundError':
    case 'OverconstrainedError':
      return new ScanError('no-camera');
    case 'NotReadableError':
    case 'AbortError':
      return new ScanError('busy');
    default:
      return new ScanError('no-camera');
  }
}

/** One family of readers each: a frame with several codes yields each family's find. */
function readers(ZXing) {
  const F = ZXing.BarcodeFormat;
  const hints = new Map();
  hints.set(ZXing.DecodeHintType.TRY_HARDER, true);
  hints.set(ZXing.DecodeHintType.POSSIBLE_FORMATS, [F.CODE_128, F.CODE_39, F.CODE_93, F.ITF, F.CODABAR]);
  return [
    { reader: new ZXing.MultiFormatOneDReader(hints), hints },
    { reader: new ZXing.QRCodeReader(), hints },
    { reader: new ZXing.DataMatrixReader(), hints },
  ];
}

/** The texts of the codes one frame shows (none if it shows none). */
function readFrame(ZXing, families, image) {
  const { data, width, height } = image;
  const luminance = new Uint8ClampedArray(width * height);
  for (let i = 0, p = 0; i < luminance.length; i++, p += 4) {
    luminance[i] = (data[p] * 77 + data[p + 1] * 150 + data[p + 2] * 29) >> 8;
  }
  const bitmap = new ZXing.BinaryBitmap(new ZXing.HybridBinarizer(new ZXing.RGBLuminanceSource(luminance, width, height)));
  const texts = [];
  for (const { reader, hints } of families) {
    try {
      texts.push(reader.decode(bitmap, hints).getText().trim());
    } catch (e) {
      // NotFound, Checksum or Format: this family sees no readable code in this frame.
    } finally {
      reader.reset();
    }
  }
  return texts;
}

/**
 * A camera session: `scan()` resolves with the first code whose text `isSerial` accepts and
 * rejects with a ScanError; `stop()` ends it (the promise then resolves with undefined).
 * `onOther(text)` is told of codes that are not serials. The camera is released in every case.
 */
export class Scanner {
  constructor(video, { isSerial, onOther }) {
    this.video = video;
    this.isSerial = isSerial;
    this.onOther = onOther;
    this.stream = undefined;
    this.finish = undefined;
    this.timer = undefined;
    this.stopped = false;
  }

  async scan() {
    const ZXing = await decoder();
    if (this.stopped) return undefined;
    let stream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({
        audio: false,
        video: { facingMode: { ideal: 'environment' }, width: { ideal: 1280 }, height: { ideal: 720 } },
      });
    } catch (e) {
      throw cameraError(e);
    }
    this.stream = stream;
    if (this.stopped) {
      // Stopped while the browser was asking for the camera: give it back at once.
      this.release();
      return undefined;
    }
    this.video.srcObject = stream;
    await this.video.play().catch(() => {});
    const families = readers(ZXing);
    const canvas = document.createElement('canvas');
    const context = canvas.getContext('2d', { willReadFrequently: true });
    const startedAt = performance.now();
    return new Promise((resolve, reject) => {
      this.finish = (result, error) => {
        this.release();
        if (error) reject(error);
        else resolve(result);
      };
      const tick = () => {
        if (this.stopped || !this.stream) {
          // Stopped while the video was starting.
          this.finish(undefined);
          return;
        }
        if (performance.now() - startedAt > GIVE_UP_MS) {
          this.finish(undefined, new ScanError('timeout'));
          return;
        }
        const { videoWidth, videoHeight } = this.video;
        if (videoWidth && videoHeight) {
          const scale = Math.min(1, MAX_FRAME_WIDTH / videoWidth);
          canvas.width = Math.round(videoWidth * scale);
          canvas.height = Math.round(videoHeight * scale);
          context.drawImage(this.video, 0, 0, canvas.width, canvas.height);
          const texts = readFrame(ZXing, families, context.getImageData(0, 0, canvas.width, canvas.height));
          const serial = texts.find((t) => this.isSerial(t));
          if (serial) {
            this.finish(serial);
            return;
          }
          if (texts.length) this.onOther(texts[0]);
        }
        this.timer = setTimeout(tick, FRAME_INTERVAL_MS);
      };
      tick();
    });
  }

  /** Ends the session, if one is running, and releases the camera. */
  stop() {
    this.stopped = true;
    if (this.finish) this.finish(undefined);
    else this.release();
  }

  release() {
    clearTimeout(this.timer);
    this.finish = undefined;
    if (this.stream) for (const track of this.stream.getTracks()) track.stop();
    this.stream = undefined;
    this.video.srcObject = null;
  }
}

/** Why scanning stopped, in an installer's words. */
export function scanWords(kind) {
  const words = {
    blocked: "The camera is blocked for this page: allow it in the browser's site settings, or type the serial.",
    'no-camera': 'No camera this page can use was found: type the serial.',
    busy: 'The camera is in use by another app: close that app and try again, or type the serial.',
    decoder: 'The barcode reader could not be loaded: check the connection and try again, or type the serial.',
    timeout: 'No serial barcode was found, so the camera was turned off: try again closer to the label, or type the serial.',
  };
  return words[kind] || 'Scanning failed: type the serial.';
}

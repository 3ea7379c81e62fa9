// PfcRecordBlockDataset: one TFRecord file of tf.train.Example records as a dataset of blocks of
// (image bytes, label) pairs.
//
// Element: (start [] int64, images [n] string, labels [n] int64, done [] bool):
//   start   the index in the file of the block's first record;
//   images, labels
//           of the next n <= block_records records (framing and both CRCs checked), parsed: the
//           bytes feature image_key and the int64 feature label_key, each holding exactly one
//           value; a record that is not such an Example comes out as image "" (which no decoder
//           accepts) and label -1;
//   done    true on the file's last block: the records stop there, at the end of the file or at
//           the first record that cannot be read (bad length CRC, bad data CRC, truncation, I/O
//           error). That block may be empty; start + n is then the number of records read.
// An error never fails the dataset: the reader compares the count read with its manifest, and
// names the file and record index of a record that does not decode (pipelines/reader.py).
//
// Why: tf.data.TFRecordDataset yields one record per element: batched into blocks behind
// ignore_errors and an end mark, each record went through four iterators and one more copy, and
// tf.io.parse_example ran in TensorFlow's intra-op threads, waking them. Here a block is read
// and parsed (by the parser tf.io.parse_example uses) in one call, in the calling thread.
#include <memory>
#include <string>
#include <vector>

#include "tensorflow/core/framework/dataset.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/lib/io/record_reader.h"
#include "tensorflow/core/platform/env.h"
#include "tensorflow/core/util/example_proto_fast_parsing.h"

namespace pfc {

using ::tensorflow::data::DatasetBase;
using ::tensorflow::data::DatasetContext;
using ::tensorflow::data::DatasetIterator;
using ::tensorflow::data::DatasetOpKernel;
using ::tensorflow::data::IteratorBase;
using ::tensorflow::data::IteratorContext;
using ::tensorflow::data::IteratorStateReader;
using ::tensorflow::data::IteratorStateWriter;
using ::tensorflow::data::SerializationContext;
using ::tensorflow::DataTypeVector;
using ::tensorflow::Node;
using ::tensorflow::OpKernelConstruction;
using ::tensorflow::OpKernelContext;
using ::tensorflow::PartialTensorShape;
using ::tensorflow::RandomAccessFile;
using ::tensorflow::Status;
using ::tensorflow::Tensor;
using ::tensorflow::TensorShape;
using ::tensorflow::tstring;

REGISTER_OP("PfcRecordBlockDataset")
    .Input("filename: string")
    .Input("block_records: int64")
    .Input("buffer_size: int64")
    .Attr("image_key: string")
    .Attr("label_key: string")
    .Output("handle: variant")
    .SetDoNotOptimize()  // reads a file: not to be rewritten or folded
    .SetShapeFn(::tensorflow::shape_inference::ScalarShape);

class RecordBlockDatasetOp : public DatasetOpKernel {
 public:
  explicit RecordBlockDatasetOp(OpKernelConstruction* ctx) : DatasetOpKernel(ctx) {
    OP_REQUIRES_OK(ctx, ctx->GetAttr("image_key", &image_key_));
    OP_REQUIRES_OK(ctx, ctx->GetAttr("label_key", &label_key_));
  }

  void MakeDataset(OpKernelContext* ctx, DatasetBase** output) override {
    tstring filename;
    int64_t block = 0, buffer_size = 0;
    OP_REQUIRES_OK(ctx, ::tensorflow::data::ParseScalarArgument<tstring>(ctx, "filename", &filename));
    OP_REQUIRES_OK(ctx, ::tensorflow::data::ParseScalarArgument<int64_t>(ctx, "block_records", &block));
    OP_REQUIRES_OK(ctx, ::tensorflow::data::ParseScalarArgument<int64_t>(ctx, "buffer_size", &buffer_size));
    OP_REQUIRES(ctx, block > 0, ::tensorflow::errors::InvalidArgument("block_records must be > 0, got ", block));
    OP_REQUIRES(ctx, buffer_size >= 0,
                ::tensorflow::errors::InvalidArgument("buffer_size must be >= 0, got ", buffer_size));
    *output = new Dataset(ctx, std::string(filename), block, buffer_size, image_key_, label_key_);
  }

 private:
  std::string image_key_;
  std::string label_key_;

  class Dataset : public DatasetBase {
   public:
    Dataset(OpKernelContext* ctx, std::string filename, int64_t block, int64_t buffer_size,
            std::string image_key, std::string label_key)
        : DatasetBase(DatasetContext(ctx)), filename_(std::move(filename)), block_(block),
          buffer_size_(buffer_size), image_key_(std::move(image_key)), label_key_(std::move(label_key)) {
      // As tf.io.parse_example with FixedLenFeature([], string / int64) and no default: both
      // features required, each with exactly one value.
      parse_.dense.emplace_back(image_key_, ::tensorflow::DT_STRING, PartialTensorShape({}),
                                Tensor(::tensorflow::DT_STRING, TensorShape({0})), false, 1);
      parse_.dense.emplace_back(label_key_, ::tensorflow::DT_INT64, PartialTensorShape({}),
                                Tensor(::tensorflow::DT_INT64, TensorShape({0})), false, 1);
    }

    std::unique_ptr<IteratorBase> MakeIteratorInternal(const std::string& prefix) const override {
      return std::make_unique<Iterator>(Iterator::Params{this, prefix + "::PfcRecordBlock"});
    }

    const DataTypeVector& output_dtypes() const override {
      static const DataTypeVector* dtypes =
          new DataTypeVector({::tensorflow::DT_INT64, ::tensorflow::DT_STRING, ::tensorflow::DT_INT64,
                              ::tensorflow::DT_BOOL});
      return *dtypes;
    }

    const std::vector<PartialTensorShape>& output_shapes() const override {
      static const std::vector<PartialTensorShape>* shapes =
          new std::vector<PartialTensorShape>({PartialTensorShape({}), PartialTensorShape({-1}),
                                               PartialTensorShape({-1}), PartialTensorShape({})});
      return *shapes;
    }

    std::string DebugString() const override { return "PfcRecordBlockDatasetOp::Dataset"; }

    Status InputDatasets(std::vector<const DatasetBase*>* inputs) const override {
      return ::tensorflow::OkStatus();
    }

    Status CheckExternalState() const override { return ::tensorflow::OkStatus(); }

   protected:
    Status AsGraphDefInternal(SerializationContext* ctx, DatasetGraphDefBuilder* b,
                              Node** output) const override {
      Node* filename = nullptr;
      Node* block = nullptr;
      Node* buffer_size = nullptr;
      TF_RETURN_IF_ERROR(b->AddScalar(tstring(filename_), &filename));
      TF_RETURN_IF_ERROR(b->AddScalar(block_, &block));
      TF_RETURN_IF_ERROR(b->AddScalar(buffer_size_, &buffer_size));
      ::tensorflow::AttrValue image_key, label_key;
      b->BuildAttrValue(image_key_, &image_key);
      b->BuildAttrValue(label_key_, &label_key);
      return b->AddDataset(this, {filename, block, buffer_size},
                           {{"image_key", image_key}, {"label_key", label_key}}, output);
    }

   private:
    class Iterator : public DatasetIterator<Dataset> {
     public:
      explicit Iterator(const Params& params) : DatasetIterator<Dataset>(params) {}

      Status GetNextInternal(IteratorContext* ctx, std::vector<Tensor>* out_tensors,
                             bool* end_of_sequence) override {
        ::tensorflow::mutex_lock lock(mu_);
        if (finished_) {
          *end_of_sequence = true;
          return ::tensorflow::OkStatus();
        }
        bool done = false;
        if (reader_ == nullptr) {
          // A file that cannot be opened is a file of which no record could be read.
          Status opened = ctx->env()->NewRandomAccessFile(dataset()->filename_, &file_);
          if (opened.ok()) {
            ::tensorflow::io::RecordReaderOptions options;
            options.buffer_size = dataset()->buffer_size_;
            reader_ = std::make_unique<::tensorflow::io::RecordReader>(file_.get(), options);
          } else {
            done = true;
          }
        }
        const int64_t block = dataset()->block_;
        records_.resize(block);
        int64_t n = 0;
        while (!done && n < block) {
          // OutOfRange at the end of the file; DataLoss or an I/O error at a record that cannot
          // be read: either way the file's records stop here.
          if (reader_->ReadRecord(&offset_, &records_[n]).ok()) {
            ++n;
          } else {
            done = true;
          }
        }
        Tensor images, labels;
        Parse(absl::MakeConstSpan(records_.data(), n), &images, &labels);
        Tensor start(ctx->allocator({}), ::tensorflow::DT_INT64, TensorShape({}));
        start.scalar<int64_t>()() = next_index_;
        Tensor last(ctx->allocator({}), ::tensorflow::DT_BOOL, TensorShape({}));
        last.scalar<bool>()() = done;
        out_tensors->clear();
        out_tensors->push_back(std::move(start));
        out_tensors->push_back(std::move(images));
        out_tensors->push_back(std::move(labels));
        out_tensors->push_back(std::move(last));
        next_index_ += n;
        if (done) {
          finished_ = true;
          reader_.reset();
          file_.reset();
        }
        *end_of_sequence = false;
        return ::tensorflow::OkStatus();
      }

     protected:
      std::shared_ptr<::tensorflow::data::model::Node> CreateNode(
          IteratorContext* ctx, ::tensorflow::data::model::Node::Args args) const override {
        return ::tensorflow::data::model::MakeSourceNode(std::move(args));
      }

      Status SaveInternal(SerializationContext* ctx, IteratorStateWriter* writer) override {
        return ::tensorflow::errors::Unimplemented("PfcRecordBlockDataset does not save iterator state");
      }

      Status RestoreInternal(IteratorContext* ctx, IteratorStateReader* reader) override {
        return ::tensorflow::errors::Unimplemented("PfcRecordBlockDataset does not restore iterator state");
      }

     private:
      // Parses records into images [n] and labels [n] with TensorFlow's own Example parser (the
      // one tf.io.parse_example runs), in this thread. It fails for a whole block if one record
      // is bad; then the block is parsed record by record, a bad one given image "" and label -1.
      void Parse(absl::Span<const tstring> records, Tensor* images, Tensor* labels) {
        const auto& config = dataset()->parse_;
        ::tensorflow::example::Result whole;
        if (::tensorflow::example::FastParseExample(config, records, {}, nullptr, &whole).ok()) {
          *images = std::move(whole.dense_values[0]);
          *labels = std::move(whole.dense_values[1]);
          return;
        }
        const int64_t n = records.size();
        *images = Tensor(::tensorflow::DT_STRING, TensorShape({n}));
        *labels = Tensor(::tensorflow::DT_INT64, TensorShape({n}));
        for (int64_t i = 0; i < n; ++i) {
          ::tensorflow::example::Result one;
          if (::tensorflow::example::FastParseExample(config, records.subspan(i, 1), {}, nullptr, &one).ok()) {
            images->flat<tstring>()(i) = std::move(one.dense_values[0].flat<tstring>()(0));
            labels->flat<int64_t>()(i) = one.dense_values[1].flat<int64_t>()(0);
          } else {
            labels->flat<int64_t>()(i) = -1;  // (images stays "")
          }
        }
      }

      ::tensorflow::mutex mu_;
      std::vector<tstring> records_;  // the block's records, until parsed
      std::unique_ptr<RandomAccessFile> file_;
      std::unique_ptr<::tensorflow::io::RecordReader> reader_;
      uint64_t offset_ = 0;      // byte offset of the next record
      int64_t next_index_ = 0;   // index of the next record
      bool finished_ = false;
    };

    const std::string filename_;
    const int64_t block_;
    const int64_t buffer_size_;
    const std::string image_key_;
    const std::string label_key_;
    ::tensorflow::example::FastParseExampleConfig parse_;
  };
};

REGISTER_KERNEL_BUILDER(Name("PfcRecordBlockDataset").Device(::tensorflow::DEVICE_CPU),
                        RecordBlockDatasetOp);

}  // namespace pfc
